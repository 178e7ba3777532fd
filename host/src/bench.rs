//! `lguest --bench`.
pub fn run(_kvm: &std::path::Path) -> Result<(), String> {
    Err("benchmarks: work in progress".into())
}
