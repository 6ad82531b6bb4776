//! The example configs in deploy/ are parsed and validated by the same code
//! the binaries use, so they cannot rot.

use std::path::Path;

#[test]
fn example_node_config_is_valid_and_declares_the_ctdc_schema() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
    let cfg =
        fedq_node::config::NodeConfig::load(&path).expect("deploy/node.example.toml is valid");
    let cases = cfg.dataset("cases").expect("declares cases");
    assert_eq!(
        cases.columns,
        fedq_engine::synth::ctdc_columns(),
        "matches the synthetic schema"
    );
    assert!(cases.budget.per_query_max <= cases.budget.per_analyst);
}

#[test]
fn example_federation_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/federation.example.toml");
    let cfg = fedq::federation::FederationConfig::load(&path)
        .expect("deploy/federation.example.toml is valid");
    assert_eq!(cfg.nodes.len(), 3);
}
