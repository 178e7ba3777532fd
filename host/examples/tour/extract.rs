// The tour's extractor, shared by the example that writes docs/tour.md and
// the test that checks it (included by both).

/// One tagged comment.
#[derive(Debug)]
pub struct Stop {
    pub tag: String,
    pub number: u32,
    pub file: String,
    pub line: usize,
    pub text: String,
    /// The first line of code after the comment: what the tag is about.
    pub code: String,
}

/// The source files the tour reads, relative to the repository root.
fn sources(root: &std::path::Path) -> Vec<String> {
    let mut files = Vec::new();
    for dir in ["host/src", "guest/src", "abi/src"] {
        let mut stack = vec![root.join(dir)];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    let rel = p.strip_prefix(root).unwrap_or(&p);
                    files.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
    }
    files.sort();
    files
}

/// Every tagged comment of one file.
pub fn stops_in(file: &str, src: &str) -> Result<Vec<Stop>, String> {
    let lines: Vec<&str> = src.lines().collect();
    let mut stops = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let trimmed = lines[i].trim_start();
        let tagged = trimmed.strip_prefix("/*").and_then(|rest| {
            let mut chars = rest.chars();
            let letter = chars.next().filter(|c| "LGHDS".contains(*c))?;
            let rest = chars.as_str().strip_prefix(':')?;
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            (digits.len() == 3).then(|| (letter, digits.clone(), rest[digits.len()..].to_string()))
        });
        let Some((letter, digits, first)) = tagged else {
            i += 1;
            continue;
        };
        let start = i;
        let mut text = Vec::new();
        let mut piece = first;
        loop {
            let (body, done) = match piece.find("*/") {
                Some(end) => (piece[..end].to_string(), true),
                None => (piece.clone(), false),
            };
            let body = body.trim();
            let body = body.strip_prefix('*').map(str::trim_start).unwrap_or(body);
            text.push(body.to_string());
            if done {
                break;
            }
            i += 1;
            if i == lines.len() {
                return Err(format!(
                    "{file}:{}: tag {letter}:{digits} never ends",
                    start + 1
                ));
            }
            piece = lines[i].trim().to_string();
        }
        // What the tag points at: the next line that is code.
        let code = lines[i + 1..]
            .iter()
            .map(|l| l.trim())
            .find(|l| !l.is_empty() && !l.starts_with("//") && !l.starts_with("#["))
            .unwrap_or("");
        if code.is_empty() || code.starts_with("/*") || code == "}" {
            return Err(format!(
                "{file}:{}: tag {letter}:{digits} points at nothing",
                start + 1
            ));
        }
        let text = text
            .join("\n")
            .split("\n\n")
            .map(|para| para.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n");
        stops.push(Stop {
            tag: format!("{letter}:{digits}"),
            number: digits.parse().expect("three digits"),
            file: file.to_string(),
            line: start + 1,
            text,
            code: code.trim_end_matches('{').trim().to_string(),
        });
        i += 1;
    }
    Ok(stops)
}

/// The whole tour, as markdown.
pub fn tour(root: &std::path::Path) -> Result<String, String> {
    let mut stops = Vec::new();
    for file in sources(root) {
        let src = std::fs::read_to_string(root.join(&file))
            .map_err(|e| format!("cannot read {file}: {e}"))?;
        stops.extend(stops_in(&file, &src)?);
    }
    stops.sort_by_key(|s| s.number);
    for pair in stops.windows(2) {
        if pair[0].number == pair[1].number {
            return Err(format!(
                "{} ({}:{}) and {} ({}:{}) share a number",
                pair[0].tag, pair[0].file, pair[0].line, pair[1].tag, pair[1].file, pair[1].line
            ));
        }
    }
    let mut out = String::from(
        "# A tour of lguest in Rust\n\n\
         Generated from the tagged comments in the code (`/*L:100 ...*/`) by\n\
         `cargo run --example tour`; `cargo test` fails when this page is stale.\n\
         Read it in order: it follows one Guest from the command line to its end.\n\
         L is the Launcher, G the Guest, H the Host, D the devices, S the ring-0\n\
         stubs that stand in for lguest's Switcher.\n",
    );
    for s in &stops {
        out.push_str(&format!(
            "\n## {} — [{}](../{})\n\n{}\n\n`{}`\n",
            s.tag, s.file, s.file, s.text, s.code
        ));
    }
    Ok(out)
}
