"""The `fedq` Python package against a real demo federation: three nodes
over mutual TLS, answers with real noise, a real budget ledger."""

from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest

import fedq

RESULT_COLUMNS = ["aggregate", "value", "ci_low", "ci_high", "n_nodes"]
NODES = ["ngo-north", "hotline-central", "casework-south"]


def spent(fed: fedq.Federation) -> dict:
    b = fed.budget()
    return dict(zip(b["node"], b["spent_by_you"]))


def domain(fed: fedq.Federation, column: str) -> list:
    s = fed.schema()
    row = s[(s["node"] == NODES[0]) & (s["column"] == column)].iloc[0]
    return list(row["domain"])


def test_count_group_by_is_a_dataframe_with_intervals(fed):
    before = spent(fed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every node answers: no warning
        df = fed.query(
            "SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender",
            epsilon=0.5,
        )
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns) == ["gender"] + RESULT_COLUMNS
    # Every key of the declared domain, plus (missing), one row each.
    assert list(df["gender"]) == domain(fed, "gender") + ["(missing)"]
    assert (df["aggregate"] == "COUNT(*)").all()
    assert (df["n_nodes"] == 3).all()
    for row in df.itertuples():
        assert row.ci_low <= row.value <= row.ci_high, row
        assert row.ci_high - row.ci_low > 0, row
    # Forced labour among tens of thousands of synthetic cases: the female
    # count is in the thousands, far above its interval's half-width.
    female = df[df["gender"] == "Female"].iloc[0]
    assert female.value > 1000
    assert female.ci_high - female.ci_low < 0.1 * female.value
    # Per-node statuses and costs.
    nodes = fedq.nodes_of(df)
    assert list(nodes["node"]) == NODES
    assert (nodes["status"] == "answered").all()
    assert (nodes["cost"] == 0.5).all()
    assert nodes["failure"].isna().all()
    q = df.attrs["query"]
    assert q["epsilon"] == 0.5 and q["dataset"] == "cases" and not q["partial"]
    assert q["group_by"] == ["gender"] and q["mechanisms"] == ["discrete_laplace"]
    after = spent(fed)
    for node in NODES:
        assert math.isclose(after[node], before[node] + 0.5), (node, before, after)


def test_several_aggregates_are_one_row_each(fed):
    df = fed.query(
        "SELECT ageBroad, COUNT(*), AVG(traffickMonths), MEDIAN(traffickMonths) FROM cases GROUP BY ageBroad",
        epsilon=1.0,
    )
    assert list(df.columns) == ["ageBroad"] + RESULT_COLUMNS
    keys = domain(fed, "ageBroad") + ["(missing)"]
    assert len(df) == 3 * len(keys)
    assert set(df["aggregate"]) == {
        "COUNT(*)",
        "AVG(traffickMonths)",
        "MEDIAN(traffickMonths)",
    }
    for row in df.dropna(subset=["value"]).itertuples():
        assert row.ci_low <= row.value <= row.ci_high, row


def test_dry_run_spends_nothing_and_returns_the_plan(fed):
    before = fed.budget()
    df = fed.query(
        "SELECT ageBroad, COUNT(*) FROM cases GROUP BY ageBroad",
        epsilon=0.5,
        dry_run=True,
    )
    after = fed.budget()
    pd.testing.assert_frame_equal(before, after)
    assert list(df.columns) == [
        "measurement",
        "node",
        "epsilon",
        "rho",
        "mechanism",
        "scale",
        "ci95_half_width",
    ]
    assert list(df["node"]) == NODES + ["combined (3 nodes)"]
    per_node = df[df["node"].isin(NODES)]
    assert (per_node["mechanism"] == "discrete_laplace").all()
    assert (per_node["epsilon"] == 0.5).all()
    # A count's sensitivity is 1: scale 1 / epsilon.
    assert (per_node["scale"] == 2.0).all()
    combined = df[df["node"] == "combined (3 nodes)"].iloc[0]
    assert combined["ci95_half_width"] > per_node["ci95_half_width"].max()
    nodes = fedq.nodes_of(df)
    assert (nodes["cost"] == 0.5).all()
    assert df.attrs["query"]["dry_run"]


def test_a_retry_under_the_same_id_spends_nothing_more(fed):
    sql = "SELECT COUNT(*) FROM cases WHERE isSexualExploit = 1"
    first = fed.query(sql, epsilon=0.25, query_id="python-retry-1")
    before = spent(fed)
    again = fed.query(sql, epsilon=0.25, query_id="python-retry-1")
    assert spent(fed) == before
    assert list(again["value"]) == list(first["value"])
    assert fedq.nodes_of(again)["replayed"].all()


def test_a_typo_raises_query_error_once_and_spends_nothing(fed):
    before = spent(fed)
    with pytest.raises(fedq.QueryError) as e:
        fed.query("SELECT gendr, COUNT(*) FROM cases GROUP BY gendr", epsilon=0.5)
    assert 'unknown column "gendr"' in str(e.value)
    assert 'did you mean "gender"' in str(e.value)
    assert "nothing was spent" in str(e.value)
    assert e.value.nodes == {}  # refused here, before any node was asked
    assert spent(fed) == before


def test_sql_outside_the_subset_raises_with_the_reason(fed):
    with pytest.raises(fedq.QueryError) as e:
        fed.query("SELECT MAX(traffickMonths) FROM cases", epsilon=0.5)
    assert "MAX" in str(e.value)
    assert "quantile" in str(e.value).lower()


def test_every_node_refusing_raises_with_each_node_message(fed):
    before = spent(fed)
    with pytest.raises(fedq.QueryError) as e:
        # Above the demo nodes' per-query maximum of 2.
        fed.query("SELECT COUNT(*) FROM cases", epsilon=5)
    assert "no node answered" in str(e.value)
    assert list(e.value.nodes) == NODES  # in federation order
    for node, said in e.value.nodes.items():
        assert "per-query maximum" in said, (node, said)
    assert spent(fed) == before


def test_a_quorum_not_reached_raises_quorum_error_and_spends_nothing(fed):
    before = spent(fed)
    with pytest.raises(fedq.QuorumError) as e:
        fed.query("SELECT COUNT(*) FROM cases", epsilon=5, min_nodes=2)
    assert "0 node(s) accepted the query, 2 needed" in str(e.value)
    assert list(e.value.nodes) == NODES
    assert all("per-query maximum" in said for said in e.value.nodes.values()), e.value.nodes
    assert isinstance(e.value, fedq.QueryError)
    assert spent(fed) == before


def test_bad_arguments_raise_input_error(fed):
    with pytest.raises(fedq.InputError, match="epsilon must be a positive"):
        fed.query("SELECT COUNT(*) FROM cases", epsilon=-1)
    with pytest.raises(ValueError, match="only one of"):
        fed.query("SELECT COUNT(*) FROM cases", epsilon=0.5, rho=0.1)
    with pytest.raises(fedq.InputError, match="give epsilon="):
        fed.query("SELECT COUNT(*) FROM cases")
    with pytest.raises(fedq.InputError, match="too long"):
        fed.query("SELECT COUNT(*) FROM cases", epsilon=0.5, timeout=1e300)
    with pytest.raises(fedq.InputError, match="min_nodes"):
        fed.query("SELECT COUNT(*) FROM cases", epsilon=0.5, min_nodes=4)


def test_a_missing_federation_file_raises(tmp_path):
    with pytest.raises(fedq.FederationError, match="cannot load"):
        fedq.Federation(tmp_path / "nowhere.toml")


def test_quorum_and_target_ci(fed):
    df = fed.query(
        "SELECT gender, COUNT(*) FROM cases GROUP BY gender",
        target_ci=100,
        min_nodes=3,
    )
    target = df.attrs["query"]["target"]
    assert target["expected_half_width"] <= 100
    assert df.attrs["query"]["epsilon"] == target["epsilon"]
    assert ((df["ci_high"] - df["ci_low"]) / 2 <= 100 + 1).all()


def test_budget_dataframe(fed):
    b = fed.budget()
    assert list(b.columns) == [
        "node",
        "dataset",
        "measure",
        "spent_by_you",
        "remaining_for_you",
        "remaining_for_dataset",
        "per_query_max",
        "spent_epsilon",
        "spent_delta",
        "error",
    ]
    assert list(b["node"]) == NODES
    assert (b["dataset"] == "cases").all()
    assert (b["measure"] == "pure").all()
    assert (b["per_query_max"] == 2.0).all()
    # The demo's analyst may spend 10 per node.
    for row in b.itertuples():
        assert math.isclose(row.spent_by_you + row.remaining_for_you, 10.0), row
    assert b["error"].isna().all()


def test_schema_dataframe(fed):
    s = fed.schema()
    assert list(s.columns) == [
        "node",
        "dataset",
        "privacy_unit",
        "column",
        "type",
        "domain",
        "min",
        "max",
        "error",
    ]
    assert set(s["node"]) == set(NODES)
    months = s[(s["node"] == "ngo-north") & (s["column"] == "traffickMonths")].iloc[0]
    assert months["type"] == "integer"
    assert (months["min"], months["max"]) == (0, 120)
    gender = s[(s["node"] == "ngo-north") & (s["column"] == "gender")].iloc[0]
    assert gender["type"] == "categorical"
    assert "Female" in gender["domain"]
    assert set(s["type"]) <= {"categorical", "integer", "boolean", "categorical (open)"}
