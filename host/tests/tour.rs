//! docs/tour.md is generated from the tagged comments (`/*H:100 ...*/`) by
//! `cargo run --example tour`: it must be up to date, and every tag must
//! point at code.

include!("../examples/tour/extract.rs");

#[test]
fn the_tour_is_up_to_date() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fresh = tour(&root).unwrap_or_else(|e| panic!("{e}"));
    let stored = std::fs::read_to_string(root.join("docs/tour.md")).unwrap_or_default();
    assert!(
        fresh == stored,
        "docs/tour.md is stale: run `cargo run --example tour`"
    );
    assert!(
        fresh.matches("\n## ").count() >= 10,
        "the tour is too short"
    );
}

#[test]
fn a_tag_must_point_at_code() {
    let src = "fn a() {}\n/*H:900 a stop with nothing after it */\n}\n";
    let err = stops_in("x.rs", src).unwrap_err();
    assert!(err.contains("points at nothing"), "{err}");
    let ok = "/*H:901 here:\n * the run loop. */\nfn run() {\n";
    let stops = stops_in("x.rs", ok).unwrap();
    assert_eq!(stops[0].tag, "H:901");
    assert_eq!(stops[0].text, "here: the run loop.");
    assert_eq!(stops[0].code, "fn run()");
}
