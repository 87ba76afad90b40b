//! `shardserve crd`: prints the `ModelDeployment` CustomResourceDefinition,
//! generated from the Rust types. `crds/` holds exactly this output.

use anyhow::Result;

pub fn run() -> Result<()> {
    print!("{}", shardserve_operator::crd_yaml()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// Where the checked-in copy lives, relative to the repository root.
    const CRD_FILE: &str = "crds/modeldeployments.shardserve.io.yaml";

    #[test]
    fn checked_in_crd_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(CRD_FILE);
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = shardserve_operator::crd_yaml().unwrap();
        assert!(
            on_disk == generated,
            "{CRD_FILE} differs from the generated CRD; regenerate it with \
             `cargo run -p shardserve -- crd > {CRD_FILE}`"
        );
    }
}
