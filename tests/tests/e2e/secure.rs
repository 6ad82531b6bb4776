//! Secure aggregation end to end, over real nodes and mTLS: the combined
//! answer carries about one central release's noise instead of one per
//! node, and covers the truth; the coordinator sees only masked shares;
//! each node debits its whole release and logs the round; and the trust
//! checks hold from outside: a substituted key, a set below a node's
//! `min_honest`, a dataset without the policy and a retry with another
//! participant set are refused, spending nothing (or, for the retry,
//! nothing more). Calibrated tests (false failure below 1e-6 each, stated
//! on each): one node's masked values are uniform to the coordinator over
//! 200 rounds; different participant sets sent to different nodes give a
//! garbage sum that the coordinator refuses; COUNT, AVG, VARIANCE,
//! HISTOGRAM and MEDIAN cover the truth securely.

use std::collections::HashMap;
use std::time::Duration;

use fedq::client::{new_query_id, Calls};
use fedq::combine::combine_at;
use fedq::run::{run_query, QueryOptions};
use fedq_dp::accounting::Measure;
use fedq_engine::synth::Partner;
use fedq_ledger::audit::Event;
use fedq_node::config::{BudgetLimits, SecureAggregationConfig};
use fedq_pki::Role;
use fedq_proto::v1::node_client::NodeClient;
use fedq_proto::v1::{
    BudgetRequest, CancelRequest, CommitRequest, PrepareRequest, QueryRequest, RoundKey,
};
use fedq_tests::{exact_counts, TestFederation};
use tonic::transport::Channel;
use tonic::Code;

const SQL: &str = "SELECT gender, COUNT(*) FROM cases GROUP BY gender";

/// Enough noise per share (scale about 1.8) that the shares' sum is
/// within a hair of one central discrete Gaussian (tau vanishes).
const RHO: f64 = 0.05;

fn zcdp() -> BudgetLimits {
    BudgetLimits {
        keys_delta: None,
        keys_delta_per_analyst: None,
        keys_delta_total: None,
        per_analyst: 20.0,
        total: 100.0,
        per_query_max: 2.0,
        measure: Measure::Zcdp,
        delta: Some(1e-7),
    }
}

/// Three zCDP nodes; those in `secure` take part in secure aggregation
/// relying on `min_honest` honest participants. "auditor" may export logs.
async fn federation(secure: &[usize], min_honest: u32) -> TestFederation {
    let partners = [
        (Partner::Ngo, 600, 31),
        (Partner::Hotline, 600, 32),
        (Partner::CaseManagement, 600, 33),
    ];
    let mut fed = TestFederation::start(&partners, zcdp()).await;
    for i in 0..fed.nodes.len() {
        fed.stop_node(i).await;
        let c = &mut fed.nodes[i].config;
        c.audit.auditors = vec!["auditor".into()];
        if secure.contains(&i) {
            c.datasets[0].secure_aggregation = Some(SecureAggregationConfig { min_honest });
        }
        fed.start_node(i).await;
    }
    fed
}

fn options(secure: bool, rho: f64) -> QueryOptions {
    QueryOptions {
        secure,
        epsilon: 0.0,
        rho,
        dry_run: false,
        calls: Calls {
            timeout: Duration::from_secs(30),
            retries: 0,
        },
        min_nodes: None,
        query_id: new_query_id(),
    }
}

fn truth(fed: &TestFederation, nodes: &[usize]) -> HashMap<Vec<String>, i64> {
    let mut all = HashMap::new();
    for &i in nodes {
        for (k, v) in exact_counts(&fed.nodes[i].csv, &["gender"], |_| true) {
            *all.entry(k).or_insert(0) += v;
        }
    }
    all
}

async fn spent(fed: &TestFederation, i: usize, analyst: &str) -> f64 {
    let mut c = fed.raw_client(i, Role::Analyst, analyst).await;
    c.budget(BudgetRequest {})
        .await
        .unwrap()
        .into_inner()
        .budgets[0]
        .spent_by_analyst
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sum_carries_one_release_of_noise_and_covers_the_truth() {
    let fed = federation(&[0, 1, 2], 3).await;
    let coordinator = fed.federation("alice");
    let truth = truth(&fed, &[0, 1, 2]);

    // --target-ci shows secure aggregation beside its epsilon: the rho it
    // would need, with the interval that rho gives with and without it,
    // from a dry run (nothing spent).
    let calls = Calls {
        timeout: Duration::from_secs(30),
        retries: 0,
    };
    let pick = fedq::query::secure_rho_for_target(&coordinator, SQL, 8.0, calls)
        .await
        .unwrap()
        .expect("every node offers secure aggregation");
    assert!(pick.half_width <= 8.0, "{pick:?}");
    assert!(pick.plain_half_width > 1.5 * pick.half_width, "{pick:?}");
    assert_eq!(pick.nodes, 3);
    let dry = run_query(
        &coordinator,
        SQL,
        &QueryOptions {
            dry_run: true,
            ..options(false, pick.rho)
        },
    )
    .await
    .unwrap();
    let plans: Vec<_> = dry.iter().map(|o| o.result.as_ref().unwrap()).collect();
    assert_eq!(
        fedq::secure::dry_run_half_width(&plans, "COUNT(*)"),
        Some(pick.half_width)
    );
    assert_eq!(spent(&fed, 0, "alice").await, 0.0);

    let secure = options(true, RHO);
    let outcomes = run_query(&coordinator, SQL, &secure).await.unwrap();
    for o in &outcomes {
        let a = o
            .result
            .as_ref()
            .unwrap_or_else(|e| panic!("{}: {e}", o.node));
        assert_eq!(a.min_honest, 3);
        assert_eq!(a.participant_set.len(), 64);
    }
    // Single draws checked at alpha 1e-6, so the test is not flaky.
    let c = combine_at(SQL, &secure.query_id, 0.0, &outcomes, 1e-6);
    assert!(!c.partial, "{:?}", c.nodes);
    assert_eq!(c.rows.len(), 4, "three genders and (missing)");
    for row in &c.rows {
        let e = row.estimates[0].expect("an estimate");
        let t = truth.get(&row.key).copied().unwrap_or(0) as f64;
        assert!(
            e.ci_low <= t && t <= e.ci_high,
            "{:?}: {t} not in {e:?}",
            row.key
        );
    }

    // The same query without secure aggregation: every node adds a whole
    // release's noise, so its interval is about sqrt(3) times wider.
    let plain = options(false, RHO);
    let outcomes = run_query(&coordinator, SQL, &plain).await.unwrap();
    let p = combine_at(SQL, &plain.query_id, 0.0, &outcomes, 0.05);
    let s = combine_at(
        SQL,
        &secure.query_id,
        0.0,
        &run_query(&coordinator, SQL, &options(true, RHO))
            .await
            .unwrap(),
        0.05,
    );
    let width = |c: &fedq::combine::Combined| {
        let e = c.rows[0].estimates[0].unwrap();
        e.ci_high - e.ci_low
    };
    let ratio = width(&s) / width(&p);
    eprintln!("secure / plain 95% interval width: {ratio}");
    assert!(
        (0.5..0.65).contains(&ratio),
        "secure interval {} vs plain {}: ratio {ratio}, about 1/sqrt(3) expected",
        width(&s),
        width(&p)
    );

    // Each node debited its whole release (three queries), and logged the
    // secure ones with their participant set.
    for i in 0..3 {
        assert!((spent(&fed, i, "alice").await - 3.0 * RHO).abs() < 1e-9);
        let (_, entries, _) = fed.pull_audit(i).await;
        let rounds: Vec<_> = entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Released {
                    secure: Some(round),
                    measurements,
                    ..
                } => Some((round.clone(), measurements[0].mechanism.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(rounds.len(), 2, "node {i}");
        for (round, mechanism) in rounds {
            assert_eq!(mechanism, "distributed_discrete_gaussian");
            assert_eq!(round.min_honest, 3);
            assert_eq!(round.participants, ["node-0", "node-1", "node-2"]);
            assert_eq!(round.participant_set.len(), 64);
        }
    }
}

/// Prepares `q` for secure aggregation on `nodes` by raw gRPC as
/// `analyst`; returns their round keys.
async fn prepare(
    fed: &TestFederation,
    analyst: &str,
    nodes: &[usize],
    q: &QueryRequest,
) -> Vec<RoundKey> {
    let mut keys = Vec::new();
    for &i in nodes {
        let mut c = fed.raw_client(i, Role::Analyst, analyst).await;
        let p = c
            .prepare(PrepareRequest {
                query: Some(q.clone()),
                hold_ms: 60_000,
                secure_aggregation: true,
            })
            .await
            .unwrap()
            .into_inner();
        keys.push(p.round_key.expect("a round key"));
    }
    keys
}

fn query(rho: f64) -> QueryRequest {
    QueryRequest {
        query_id: new_query_id(),
        sql: SQL.into(),
        epsilon: 0.0,
        dry_run: false,
        rho,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn masked_shares_hide_each_node_and_a_round_serves_one_participant_set() {
    let fed = federation(&[0, 1, 2], 2).await;
    let q = query(0.4);
    let keys = prepare(&fed, "bob", &[0, 1, 2], &q).await;
    let commit = |participants: Vec<RoundKey>| CommitRequest {
        query_id: q.query_id.clone(),
        participants,
    };

    // A key substituted in transit (the coordinator's own) is refused by
    // the node, naming the participant, before anything is debited: the
    // reservation stands, and the release below is debited once.
    let reserved = spent(&fed, 0, "bob").await;
    assert!((reserved - 0.4).abs() < 1e-9);
    let mut forged = keys.clone();
    forged[1].key = vec![9; 32];
    let mut c0 = fed.raw_client(0, Role::Analyst, "bob").await;
    let e = c0.commit(commit(forged)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("node-1"), "{}", e.message());
    assert_eq!(spent(&fed, 0, "bob").await, reserved);

    // The whole set: every node answers with a masked share.
    let mut shares = Vec::new();
    for i in 0..3 {
        let mut c = fed.raw_client(i, Role::Analyst, "bob").await;
        let a = c.commit(commit(keys.clone())).await.unwrap().into_inner();
        assert!(a
            .measurements
            .iter()
            .all(|m| m.values.is_empty() && !m.masked.is_empty()));
        shares.push(a);
    }
    let sum = |of: &[usize]| -> Vec<i64> {
        let parts: Vec<Vec<u64>> = of
            .iter()
            .map(|&i| shares[i].measurements[0].masked.clone())
            .collect();
        fedq_secagg::sum(&parts).unwrap()
    };
    let total = sum(&[0, 1, 2]);
    let all = truth(&fed, &[0, 1, 2]);
    let keys_of: Vec<Vec<String>> = shares[0].cells.iter().map(|c| c.values.clone()).collect();
    // The full sum is the truth plus noise of about one release (scale
    // ~ 1.1 here): far within 100.
    for (k, v) in keys_of.iter().zip(&total) {
        let t = all.get(k).copied().unwrap_or(0);
        assert!((v - t).abs() < 100, "{k:?}: {v} vs {t}");
    }
    // Any two shares, or one, are uniformly random modulo 2^64: nowhere
    // near the two nodes' counts (which are below 2,000).
    for pair in [[0usize, 1], [0, 2], [1, 2]] {
        assert!(sum(&pair).iter().any(|v| v.abs() > 1 << 40), "{pair:?}");
    }
    assert!(shares[0].measurements[0]
        .masked
        .iter()
        .any(|&v| (v as i64).abs() > 1 << 40));

    // A retry with the same set replays the same bytes; with another set
    // (a second sum over the same shares would reveal the difference) it
    // is refused; nothing more is spent either way.
    let before = spent(&fed, 0, "bob").await;
    let again = c0.commit(commit(keys.clone())).await.unwrap().into_inner();
    assert_eq!(
        again.measurements[0].masked,
        shares[0].measurements[0].masked
    );
    let e = c0.commit(commit(keys[..2].to_vec())).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("another participant set"),
        "{}",
        e.message()
    );
    assert_eq!(spent(&fed, 0, "bob").await, before);
    assert!((before - 0.4).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread")]
async fn rounds_nodes_do_not_accept_spend_nothing() {
    // Node 2's dataset takes no part; nodes 0 and 1 need 3 honest
    // participants.
    let fed = federation(&[0, 1], 3).await;

    // Node 2 refuses at Prepare, before anything is reserved.
    let q = query(0.3);
    let mut c2 = fed.raw_client(2, Role::Analyst, "carol").await;
    let e = c2
        .prepare(PrepareRequest {
            query: Some(q.clone()),
            hold_ms: 60_000,
            secure_aggregation: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("secure_aggregation"),
        "{}",
        e.message()
    );

    // Nodes 0 and 1 refuse a set of two at Commit: the reservation stands
    // until cancelled, and cancelling returns all of it.
    let keys = prepare(&fed, "carol", &[0, 1], &q).await;
    for i in [0, 1] {
        let mut c = fed.raw_client(i, Role::Analyst, "carol").await;
        let e = c
            .commit(CommitRequest {
                query_id: q.query_id.clone(),
                participants: keys.clone(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("min_honest"), "{}", e.message());
        c.cancel(CancelRequest {
            query_id: q.query_id.clone(),
        })
        .await
        .unwrap();
        assert_eq!(spent(&fed, i, "carol").await, 0.0);
    }

    // Through the coordinator: too few nodes can take part, so the quorum
    // fails and nothing is spent anywhere.
    let coordinator = fed.federation("dave");
    let r = run_query(&coordinator, SQL, &options(true, 0.3)).await;
    assert!(r.is_err(), "a round below min_honest must not run");
    for i in 0..3 {
        assert_eq!(spent(&fed, i, "dave").await, 0.0, "node {i}");
    }
    // Node 2 offers no secure aggregation: --target-ci shows no secure
    // figure.
    let calls = Calls {
        timeout: Duration::from_secs(30),
        retries: 0,
    };
    assert_eq!(
        fedq::query::secure_rho_for_target(&coordinator, SQL, 8.0, calls)
            .await
            .unwrap(),
        None
    );
    // An epsilon query cannot be aggregated securely: refused before
    // anything is sent.
    let mut eps = options(true, 0.0);
    eps.epsilon = 0.5;
    let e = run_query(&coordinator, SQL, &eps).await.unwrap_err();
    assert!(e.to_string().contains("rho"), "{e}");
}

/// Every present `traffickMonths` value of `nodes`' CSVs, with its gender,
/// read here independently of the node's code.
fn months(fed: &TestFederation, nodes: &[usize]) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for &i in nodes {
        let mut r = csv::Reader::from_path(&fed.nodes[i].csv).unwrap();
        let h = r.headers().unwrap().clone();
        let col = |name: &str| h.iter().position(|x| x == name).unwrap();
        let (m, g) = (col("traffickMonths"), col("gender"));
        for rec in r.records() {
            let rec = rec.unwrap();
            let v = rec.get(m).unwrap();
            if v.is_empty() || v == "-99" {
                continue;
            }
            let g = match rec.get(g).unwrap() {
                "" | "-99" => "(missing)",
                g => g,
            };
            out.push((g.to_string(), v.parse().unwrap()));
        }
    }
    out
}

/// The chi-square quantile with `df` degrees of freedom exceeded with
/// probability about `Phi(-z)` (Wilson–Hilferty).
fn chi_square_critical(df: usize, z: f64) -> f64 {
    let k = df as f64;
    let c = 2.0 / (9.0 * k);
    k * (1.0 - c + z * c.sqrt()).powi(3)
}

/// Chi-square statistic of the top 4 bits of `values` against uniform
/// (16 cells, 15 degrees of freedom).
fn top_bits_chi_square(values: &[u64]) -> f64 {
    let mut cells = [0.0f64; 16];
    for v in values {
        cells[(v >> 60) as usize] += 1.0;
    }
    let e = values.len() as f64 / 16.0;
    cells.iter().map(|o| (o - e) * (o - e) / e).sum()
}

/// Kolmogorov–Smirnov distance of `values / 2^64` from uniform on [0, 1).
fn ks_uniform(values: &[u64]) -> f64 {
    let mut u: Vec<f64> = values.iter().map(|&v| v as f64 / 2f64.powi(64)).collect();
    u.sort_by(f64::total_cmp);
    let n = u.len() as f64;
    u.iter()
        .enumerate()
        .map(|(i, &x)| (x - i as f64 / n).abs().max(((i + 1) as f64 / n - x).abs()))
        .fold(0.0, f64::max)
}

/// What the coordinator sees of one node is uniform: over 200 secure
/// rounds by raw gRPC (3 nodes, GROUP BY gender: 4 masked values each),
/// node 0's 800 masked values pass a chi-square test of their top 4 bits
/// (critical value at z = 5.3, false failure about 6e-8) and a
/// Kolmogorov–Smirnov test of uniformity on [0, 2^64) (critical distance
/// sqrt(ln(2 / 1e-7) / 1600), false failure below 1e-7); and none lies
/// within 2^32 of the node's true count of its cell (a uniform value does
/// with probability 2^-31 each: 800 x 4.7e-10 = 4e-7 for them all).
/// The whole test fails falsely less than once in a million runs. It can
/// fail: the sums of the three masked vectors (the counts plus noise, what
/// masking hides) fail the same tests.
#[tokio::test(flavor = "multi_thread")]
async fn a_nodes_masked_values_are_uniform_to_the_coordinator() {
    const ROUNDS: usize = 200;
    let fed = federation(&[0, 1, 2], 3).await;
    let truth0 = truth(&fed, &[0]);
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(fed.raw_client(i, Role::Analyst, "erin").await);
    }
    let mut node0 = Vec::new();
    let mut sums = Vec::new();
    for _ in 0..ROUNDS {
        let q = query(0.005);
        let prep = |mut c: NodeClient<Channel>| {
            let q = q.clone();
            async move {
                c.prepare(PrepareRequest {
                    query: Some(q),
                    hold_ms: 60_000,
                    secure_aggregation: true,
                })
                .await
                .unwrap()
                .into_inner()
                .round_key
                .expect("a round key")
            }
        };
        let (k0, k1, k2) = tokio::join!(
            prep(clients[0].clone()),
            prep(clients[1].clone()),
            prep(clients[2].clone())
        );
        let keys = vec![k0, k1, k2];
        let commit = |mut c: NodeClient<Channel>| {
            let r = CommitRequest {
                query_id: q.query_id.clone(),
                participants: keys.clone(),
            };
            async move { c.commit(r).await.unwrap().into_inner() }
        };
        let (a0, a1, a2) = tokio::join!(
            commit(clients[0].clone()),
            commit(clients[1].clone()),
            commit(clients[2].clone())
        );
        for (cell, &v) in a0.cells.iter().zip(&a0.measurements[0].masked) {
            let t = truth0.get(&cell.values).copied().unwrap_or(0);
            assert!(
                (v as i64).wrapping_sub(t).unsigned_abs() > 1 << 32,
                "{:?}: masked {v} is near node 0's count",
                cell.values
            );
        }
        node0.extend_from_slice(&a0.measurements[0].masked);
        let parts: Vec<Vec<u64>> = [&a0, &a1, &a2]
            .iter()
            .map(|a| a.measurements[0].masked.clone())
            .collect();
        sums.extend(
            fedq_secagg::sum(&parts)
                .unwrap()
                .into_iter()
                .map(|v| v as u64),
        );
    }
    assert_eq!(node0.len(), 4 * ROUNDS);
    let critical = chi_square_critical(15, 5.3);
    let ks_critical = ((2.0f64 / 1e-7).ln() / (2.0 * node0.len() as f64)).sqrt();
    let (chi, ks) = (top_bits_chi_square(&node0), ks_uniform(&node0));
    eprintln!(
        "node 0's masked values: top-4-bit chi-square {chi:.1} (critical {critical:.1}), KS {ks:.4} (critical {ks_critical:.4})"
    );
    assert!(chi <= critical, "top bits not uniform: chi-square {chi}");
    assert!(ks <= ks_critical, "not uniform: KS distance {ks}");
    // The unmasked sums (counts plus noise) are caught by both.
    assert!(top_bits_chi_square(&sums) > critical);
    assert!(ks_uniform(&sums) > ks_critical);
}

/// A coordinator that sends different participant sets to different
/// nodes gets nothing usable: nodes 0 and 2 (min_honest 2) are committed
/// with the whole set {0, 1, 2} and node 1 with {0, 1}. Each answers (each
/// set is large enough), but the pair masks of node 1 are salted with
/// another set's hash, so the sum of the three shares is garbage: every
/// cell is more than 2^32 from the truth (a uniform value is within it
/// with probability 2^-31: 4 cells, false failure 2e-9). The coordinator's
/// own check (`fedq::secure::unmask`) refuses the round, naming node 1,
/// and each node spent exactly its one release and logged the set it
/// answered for.
#[tokio::test(flavor = "multi_thread")]
async fn different_participant_sets_for_different_nodes_fail_closed() {
    use fedq::client::Outcome;
    use fedq_proto::v1::PrepareResponse;

    let fed = federation(&[0, 1, 2], 2).await;
    let q = query(0.3);
    let keys = prepare(&fed, "frank", &[0, 1, 2], &q).await;
    let mut outcomes = Vec::new();
    for (i, set) in [keys.clone(), keys[..2].to_vec(), keys.clone()]
        .into_iter()
        .enumerate()
    {
        let mut c = fed.raw_client(i, Role::Analyst, "frank").await;
        let a = c
            .commit(CommitRequest {
                query_id: q.query_id.clone(),
                participants: set,
            })
            .await
            .unwrap_or_else(|e| panic!("node {i}: {e:?}"))
            .into_inner();
        outcomes.push(Outcome {
            node: fed.nodes[i].name.clone(),
            result: Ok(a),
            elapsed: Duration::ZERO,
        });
    }
    let answers: Vec<_> = outcomes
        .iter()
        .map(|o| o.result.as_ref().unwrap().clone())
        .collect();
    assert_eq!(answers[0].participant_set, answers[2].participant_set);
    assert_ne!(answers[0].participant_set, answers[1].participant_set);

    let parts: Vec<Vec<u64>> = answers
        .iter()
        .map(|a| a.measurements[0].masked.clone())
        .collect();
    let all = truth(&fed, &[0, 1, 2]);
    for (cell, v) in answers[0]
        .cells
        .iter()
        .zip(fedq_secagg::sum(&parts).unwrap())
    {
        let t = all.get(&cell.values).copied().unwrap_or(0);
        assert!(
            v.wrapping_sub(t).unsigned_abs() > 1 << 32,
            "{:?}: the mismatched sum {v} is near the truth {t}",
            cell.values
        );
    }

    // The coordinator relays the whole set and refuses answers masked for
    // another.
    let prepared: Vec<(String, PrepareResponse)> = keys
        .iter()
        .map(|k| {
            (
                k.node.clone(),
                PrepareResponse {
                    round_key: Some(k.clone()),
                    ..Default::default()
                },
            )
        })
        .collect();
    let relay = fedq::secure::relay(&q, &prepared).unwrap();
    assert_eq!(relay.set_hash, answers[0].participant_set);
    let e = fedq::secure::unmask(&relay, &mut outcomes)
        .err()
        .expect("a round with mixed participant sets must be refused");
    assert!(
        e.contains("node-1") && e.contains("another participant set"),
        "{e}"
    );

    // Each node spent its one release, and logged the set it answered.
    for (i, answer) in answers.iter().enumerate() {
        assert!(
            (spent(&fed, i, "frank").await - 0.3).abs() < 1e-9,
            "node {i}"
        );
        let (_, entries, _) = fed.pull_audit(i).await;
        let rounds: Vec<_> = entries
            .iter()
            .filter_map(|e| match &e.event {
                Event::Released {
                    secure: Some(round),
                    ..
                } => Some(round.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(rounds.len(), 1, "node {i}");
        let want: &[&str] = if i == 1 {
            &["node-0", "node-1"]
        } else {
            &["node-0", "node-1", "node-2"]
        };
        assert_eq!(rounds[0].participants, want, "node {i}");
        assert_eq!(rounds[0].participant_set, answer.participant_set);
    }
}

/// Every aggregate that is a sum of per-node values works securely, and
/// covers the truth (one draw each: a miss means a wrong interval, not bad
/// luck): COUNT, AVG and VARIANCE by gender, a 12-bin HISTOGRAM and a
/// MEDIAN. At most 25 intervals are checked, each at alpha 1e-8 (not
/// 1e-6: 25 of those would fail together up to 2.5e-5 of runs), so a
/// correct combination fails falsely below 2.5e-7 of runs.
#[tokio::test(flavor = "multi_thread")]
async fn every_summed_aggregate_covers_the_truth_securely() {
    let fed = federation(&[0, 1, 2], 3).await;
    let coordinator = fed.federation("grace");
    let counts = truth(&fed, &[0, 1, 2]);
    let values = months(&fed, &[0, 1, 2]);
    let run = |sql: &'static str| {
        let coordinator = &coordinator;
        async move {
            let o = options(true, 0.5);
            let outcomes = run_query(coordinator, sql, &o).await.unwrap();
            for out in &outcomes {
                let a = out
                    .result
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{sql}: {}: {e}", out.node));
                assert_eq!(a.min_honest, 3, "{sql}");
            }
            let c = combine_at(sql, &o.query_id, 0.0, &outcomes, 1e-8);
            assert!(!c.partial, "{sql}: {:?}", c.nodes);
            c
        }
    };
    let covers = |what: String, e: Option<fedq::combine::Estimate>, t: f64| {
        let e = e.unwrap_or_else(|| panic!("{what}: no estimate"));
        assert!(e.ci_low <= t && t <= e.ci_high, "{what}: {t} not in {e:?}");
    };

    let sql = "SELECT gender, COUNT(*), AVG(traffickMonths), VARIANCE(traffickMonths) FROM cases GROUP BY gender";
    let c = run(sql).await;
    assert_eq!(c.rows.len(), 4);
    let mut checked = 0;
    for row in &c.rows {
        let count = counts.get(&row.key).copied().unwrap_or(0) as f64;
        covers(format!("COUNT {:?}", row.key), row.estimates[0], count);
        let v: Vec<f64> = values
            .iter()
            .filter(|(g, _)| *g == row.key[0])
            .map(|x| x.1 as f64)
            .collect();
        if v.len() < 100 {
            continue;
        }
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
        covers(format!("AVG {:?}", row.key), row.estimates[1], mean);
        covers(format!("VARIANCE {:?}", row.key), row.estimates[2], var);
        checked += 1;
    }
    assert!(checked >= 2, "at least two genders have 100 values");

    let sql = "SELECT HISTOGRAM(traffickMonths, 12) FROM cases";
    let c = run(sql).await;
    assert_eq!(c.rows.len(), 12);
    let edges = fedq_dp::distribution::bin_edges(0, 120, 12);
    for (b, row) in c.rows.iter().enumerate() {
        let t = values
            .iter()
            .filter(|(_, m)| edges[b] <= *m && *m < edges[b + 1])
            .count() as f64;
        covers(format!("bin {b}"), row.estimates[0], t);
    }

    let sql = "SELECT MEDIAN(traffickMonths) FROM cases";
    let c = run(sql).await;
    let mut sorted: Vec<i64> = values.iter().map(|x| x.1).collect();
    sorted.sort_unstable();
    let median = sorted[(sorted.len() as f64 * 0.5).ceil() as usize - 1] as f64;
    covers("MEDIAN".into(), c.rows[0].estimates[0], median);
}
