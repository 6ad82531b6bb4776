"""Query a fedq federation from Python, with the coordinator's own code.

``fedq`` is the ``fedq`` command's coordinator library (Rust, built into
``fedq._native``) with pandas on top: the query is planned against the
nodes' public schemas, sent over mutual TLS, every answer checked, the
noisy answers combined and their 95% intervals computed exactly as
``fedq query`` does. Only this module's DataFrames and exceptions are
Python.

    >>> import fedq
    >>> fed = fedq.Federation("demo-federation/federation.toml")
    >>> df = fed.query("SELECT gender, COUNT(*) FROM cases GROUP BY gender", epsilon=0.5)
    >>> df
             gender aggregate   value   ci_low  ci_high  n_nodes
    0        Female  COUNT(*)  ...
    >>> fedq.nodes_of(df)          # per-node status, cost and remaining budget
    >>> fed.budget()               # your budget on every node
    >>> fed.schema()               # every dataset's columns and public domains

Result layout (one row per group key and aggregate, "tidy"):

* the GROUP BY columns, by name (none without GROUP BY);
* ``aggregate``: the SELECT aggregate's label, e.g. ``COUNT(*)`` or
  ``MEDIAN(traffickMonths)``;
* ``value``, ``ci_low``, ``ci_high``: the combined noisy estimate and its
  95% interval (NaN where nothing could be estimated);
* ``n_nodes``: how many nodes' answers include the row.

``df.attrs["nodes"]`` is a list of per-node dicts (``node``, ``status``,
``failure``, ``cost``, ``measure``, ``remaining_for_analyst``, ...; see
:func:`nodes_of` for them as a DataFrame) and ``df.attrs["query"]`` holds
the query's facts (``sql``, ``query_id``, ``epsilon``, ``rho``,
``dataset``, ``partial``, ``post_processing``, ...). Both are plain
dicts and lists, so they survive pandas operations that copy ``attrs``.

A dry run (``dry_run=True``) spends nothing and returns the plan instead:
one row per measurement and node (and ``combined``) with ``epsilon``,
``rho``, ``mechanism``, ``scale`` and ``ci95_half_width``, the expected
half-width of the 95% interval.

Errors are exceptions: :class:`QueryError` (the query is wrong, or no node
answered; ``.nodes`` maps each node to what it said), :class:`QuorumError`
(fewer than ``min_nodes`` accepted; nothing spent), :class:`InputError`
(a bad argument), :class:`FederationError` (the federation file or the
nodes could not be read). A partial result (some nodes did not answer) is
returned with a :class:`PartialResultWarning`.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Dict, List, Optional

import pandas as pd

from . import _native

__all__ = [
    "Federation",
    "FedqError",
    "QueryError",
    "QuorumError",
    "InputError",
    "FederationError",
    "PartialResultWarning",
    "nodes_of",
]

__version__ = _native.__version__


class FedqError(Exception):
    """Every error of this package.

    ``message`` is the whole text as ``fedq query`` prints it; ``nodes``
    maps each node's name to what it said (empty when no node was asked).
    """

    def __init__(self, message: str, nodes: Any = None):
        super().__init__(message)
        self.message = message
        # A mapping, or (node, message) pairs in federation order.
        self.nodes: Dict[str, str] = dict(nodes or {})


class QueryError(FedqError):
    """The query is wrong (planned against the nodes' schemas, refused once
    before any node was asked), or no node answered it (``nodes`` says why
    each did not)."""


class QuorumError(QueryError):
    """Fewer nodes than ``min_nodes`` accepted: nothing was released, and
    every reservation was cancelled (nothing spent)."""


class InputError(FedqError, ValueError):
    """An argument is wrong (say, a negative epsilon); nothing was sent."""


class FederationError(FedqError):
    """The federation file, its certificates or the nodes' listings could
    not be read."""


class PartialResultWarning(UserWarning):
    """Some nodes did not answer: the result combines the others only (see
    ``df.attrs["nodes"]``)."""


_KINDS = {
    "input": InputError,
    "query": QueryError,
    "no_answer": QueryError,
    "quorum": QuorumError,
    "federation": FederationError,
}


def _unwrap(text: str) -> Any:
    """The payload of the native module's JSON envelope, or its exception."""
    doc = json.loads(text)
    if "error" in doc:
        e = doc["error"]
        raise _KINDS.get(e["kind"], FedqError)(e["message"], e.get("nodes"))
    return doc["ok"]


def _number(v: Any) -> float:
    return float("nan") if v is None else float(v)


class Federation:
    """A federation of fedq nodes, from its ``federation.toml`` (the nodes,
    the CA and your analyst certificate, as ``fedq demo`` or your
    federation's operator writes it)."""

    def __init__(self, path: "str | os.PathLike[str]"):
        self.path = os.fspath(path)
        try:
            self._native = _native.Federation(self.path)
        except ValueError as e:
            raise FederationError(f"cannot load {self.path}: {e}") from None

    def __repr__(self) -> str:
        names = ", ".join(n["name"] for n in self.nodes())
        return f"fedq.Federation({self.path!r}: {names})"

    def nodes(self) -> List[Dict[str, str]]:
        """The federation file's nodes: ``[{"name", "endpoint"}]``."""
        return _unwrap(self._native.nodes())

    def query(
        self,
        sql: str,
        epsilon: Optional[float] = None,
        rho: Optional[float] = None,
        dry_run: bool = False,
        target_ci: Optional[float] = None,
        min_nodes: Optional[int] = None,
        timeout: Optional[float] = None,
        retries: int = 2,
        query_id: Optional[str] = None,
        secure: bool = False,
    ) -> pd.DataFrame:
        """Runs ``sql`` on every node and returns the combined answer.

        Give exactly one of ``epsilon`` (pure DP, discrete Laplace noise:
        spent on every node that answers), ``rho`` (zCDP, discrete Gaussian;
        only nodes whose dataset accounts in zCDP) or ``target_ci`` (the
        smallest epsilon whose expected combined 95% interval half-width is
        at most this, found by a dry run first). ``dry_run`` spends nothing
        and returns the plan. ``min_nodes``: release only if that many nodes
        accept, otherwise nothing is spent anywhere. ``query_id``: reuse one
        to retry without spending twice. ``timeout`` (seconds per node,
        retries included; default: the federation file's) and ``retries``
        as in ``fedq query``. ``secure`` (with ``rho``): secure aggregation,
        each node adding a masked share of the noise calibrated for the
        fewest honest participants it relies on (``min_honest``), so the
        combined interval is up to sqrt(min_honest) times narrower and only
        the sum is ever seen (nodes whose datasets allow it; two phases).
        """
        payload = _unwrap(
            self._native.query(
                sql,
                epsilon=epsilon,
                rho=rho,
                dry_run=dry_run,
                target_ci=target_ci,
                min_nodes=min_nodes,
                timeout=timeout,
                retries=retries,
                query_id=query_id,
                secure=secure,
            )
        )
        combined = payload["combined"]
        for note in payload["warnings"]:
            warnings.warn(f"audit: {note}", stacklevel=2)
        if combined["partial"]:
            said = "; ".join(f"{n}: {m}" for n, m in payload["failures"])
            warnings.warn(
                f"partial result: not every node answered ({said})",
                PartialResultWarning,
                stacklevel=2,
            )
        if dry_run:
            df = _plan_frame(payload["plan"])
        else:
            df = _result_frame(combined)
        df.attrs["nodes"] = [_node_record(n) for n in combined["nodes"]]
        df.attrs["query"] = {
            "sql": payload["sql"],
            "sent": payload["sent"],
            "query_id": combined["query_id"],
            "epsilon": combined["epsilon"],
            "rho": combined.get("rho", 0.0),
            "dataset": combined["dataset"],
            "group_by": combined["group_by"],
            "outputs": combined["outputs"],
            "mechanisms": combined["mechanisms"],
            "dry_run": combined["dry_run"],
            "partial": combined["partial"],
            "post_processing": combined.get("post_processing"),
            "released_keys": combined.get("released_keys"),
            "target": payload["target"],
        }
        return df

    def budget(self) -> pd.DataFrame:
        """Your budget on every node and dataset: ``node``, ``dataset``,
        ``measure`` (``pure``: amounts in epsilon; ``zcdp``: in rho),
        ``spent_by_you``, ``remaining_for_you``, ``remaining_for_dataset``,
        ``per_query_max``, ``spent_epsilon`` and ``spent_delta`` (the
        (epsilon, delta)-DP equivalent of what you spent), ``error`` (why a
        node did not answer, else None)."""
        rows = _unwrap(self._native.budget())
        columns = [
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
        return pd.DataFrame(
            [{c: r.get(c) for c in columns} for r in rows], columns=columns
        )

    def schema(self) -> pd.DataFrame:
        """Every node's datasets and columns: ``node``, ``dataset``,
        ``privacy_unit``, ``column``, ``type`` (categorical, integer,
        boolean), ``domain`` (the declared values of a categorical column),
        ``min`` and ``max`` (an integer column's declared bounds), ``error``
        (why a node did not answer, else None). The domains and bounds are
        public metadata: they are what queries are planned against."""
        nodes = _unwrap(self._native.schema())
        columns = [
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
        rows = []
        for n in nodes:
            if "error" in n:
                rows.append({"node": n["node"], "error": n["error"]})
                continue
            for ds in n["datasets"]:
                for c in ds["columns"]:
                    bounds = c.get("bounds") or [None, None]
                    rows.append(
                        {
                            "node": n["node"],
                            "dataset": ds["name"],
                            "privacy_unit": ds["privacy_unit"],
                            "column": c["name"],
                            "type": c["type"],
                            "domain": c.get("domain"),
                            "min": bounds[0],
                            "max": bounds[1],
                            "error": None,
                        }
                    )
        df = pd.DataFrame(rows, columns=columns)
        return df.astype({"min": "Int64", "max": "Int64"})


def _result_frame(combined: Dict[str, Any]) -> pd.DataFrame:
    group_by: List[str] = combined["group_by"]
    outputs: List[str] = combined["outputs"]
    records = []
    for row in combined["rows"]:
        for label, est in zip(outputs, row["estimates"]):
            rec: Dict[str, Any] = dict(zip(group_by, row["key"]))
            rec["aggregate"] = label
            est = est or {}
            rec["value"] = _number(est.get("value"))
            rec["ci_low"] = _number(est.get("ci_low"))
            rec["ci_high"] = _number(est.get("ci_high"))
            rec["n_nodes"] = len(row["nodes"])
            records.append(rec)
    columns = group_by + ["aggregate", "value", "ci_low", "ci_high", "n_nodes"]
    return pd.DataFrame(records, columns=columns)


def _plan_frame(plan: Dict[str, Any]) -> pd.DataFrame:
    columns = [
        "measurement",
        "node",
        "epsilon",
        "rho",
        "mechanism",
        "scale",
        "ci95_half_width",
    ]
    rows = [{c: m.get(c) for c in columns} for m in plan["measurements"]]
    df = pd.DataFrame(rows, columns=columns)
    for c in ("epsilon", "rho", "scale", "ci95_half_width"):
        df[c] = df[c].map(_number)
    return df


def _node_record(n: Dict[str, Any]) -> Dict[str, Any]:
    failure = n.get("failure")
    cost = n.get("cost") or {}
    return {
        "node": n["node"],
        "status": n["status"],
        "failure": None if failure is None else f"{failure['kind']}: {failure['message']}",
        "measure": n.get("measure"),
        "cost": cost.get("amount"),
        "cost_epsilon": cost.get("epsilon"),
        "cost_delta": cost.get("delta"),
        "epsilon_spent": n.get("epsilon_spent"),
        "remaining_for_analyst": n.get("remaining_for_analyst"),
        "remaining_for_dataset": n.get("remaining_for_dataset"),
        "replayed": n["replayed"],
        "elapsed_ms": n["elapsed_ms"],
    }


def nodes_of(df: pd.DataFrame) -> pd.DataFrame:
    """The per-node statuses of a result from :meth:`Federation.query` as a
    DataFrame: ``node``, ``status`` (``answered``, ``refused``, ...),
    ``failure`` (what went wrong), ``measure``, ``cost`` (what the query
    cost there, in the measure; for a dry run, what it would cost),
    ``cost_epsilon``/``cost_delta`` (its (epsilon, delta) equivalent),
    ``epsilon_spent``, ``remaining_for_analyst``, ``remaining_for_dataset``,
    ``replayed``, ``elapsed_ms``."""
    if "nodes" not in df.attrs:
        raise ValueError("not a fedq result: df.attrs has no 'nodes'")
    return pd.DataFrame(df.attrs["nodes"])

