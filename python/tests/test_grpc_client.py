"""docs/clients.md, followed for Python: stubs generated from
proto/fedq/v1/fedq.proto with grpcio-tools, a channel with the analyst's
certificate and `grpc.ssl_target_name_override`, then a real Query to a real
demo node over mutual TLS, retried under the same id (replayed, nothing more
spent). The client runs as its own process, with only the generated stubs
and grpcio, like a researcher's script that knows nothing of fedq's code."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto"

# The client of docs/clients.md, sections 2 and 3.
CLIENT = r'''
import json, sys, uuid
import grpc
from fedq.v1 import fedq_pb2, fedq_pb2_grpc

address, node_name, ca, cert, key = sys.argv[1:6]

def channel(address, node_name, ca, cert, key, override=True):
    creds = grpc.ssl_channel_credentials(
        root_certificates=open(ca, "rb").read(),
        private_key=open(key, "rb").read(),
        certificate_chain=open(cert, "rb").read(),
    )
    options = [("grpc.ssl_target_name_override", node_name)] if override else []
    return grpc.secure_channel(address, creds, options=options)

out = {}
# Without the override the node's certificate (it names the node, not the
# address) does not match the address.
try:
    fedq_pb2_grpc.NodeStub(channel(address, node_name, ca, cert, key, override=False)).Describe(
        fedq_pb2.DescribeRequest(), timeout=10)
    out["without_override"] = "ok"
except grpc.RpcError as e:
    out["without_override"] = e.code().name

node = fedq_pb2_grpc.NodeStub(channel(address, node_name, ca, cert, key))
described = node.Describe(fedq_pb2.DescribeRequest(), timeout=10)
out["node_name"] = described.node_name
before = node.Budget(fedq_pb2.BudgetRequest(), timeout=10).budgets[0].spent_by_analyst
request = fedq_pb2.QueryRequest(
    query_id=uuid.uuid4().hex,
    sql="SELECT gender, COUNT(*) FROM cases GROUP BY gender",
    epsilon=0.5,
)
answer = node.Query(request, timeout=30)
retried = node.Query(request, timeout=30)
after = node.Budget(fedq_pb2.BudgetRequest(), timeout=10).budgets[0].spent_by_analyst
m = answer.measurements[0]
out.update(
    cells=[list(c.values) for c in answer.cells],
    label=m.label, mechanism=m.mechanism, scale=m.scale,
    half_width=m.ci95_half_width, values=list(m.values),
    replayed=[answer.replayed, retried.replayed],
    retried_values=list(retried.measurements[0].values),
    spent=[before, after],
)
try:
    node.Query(fedq_pb2.QueryRequest(query_id="has spaces", sql=request.sql, epsilon=0.5), timeout=10)
except grpc.RpcError as e:
    out["bad_id"] = [e.code().name, e.details()]
print(json.dumps(out))
'''


def endpoint(federation: Path, node: str) -> str:
    text = federation.read_text()
    m = re.search(
        r'name = "' + re.escape(node) + r'"\s*\nendpoint = "https://([^"]+)"', text
    )
    assert m, text
    return m.group(1)


def test_a_python_grpc_client_follows_docs_clients_md(demo, tmp_path):
    gen = tmp_path / "gen"
    gen.mkdir()
    # Section 1: the stubs.
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO}",
            f"--python_out={gen}",
            f"--grpc_python_out={gen}",
            str(PROTO / "fedq" / "v1" / "fedq.proto"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (gen / "fedq" / "v1" / "fedq_pb2_grpc.py").exists()
    # The fedq package is installed here too: the stubs' `fedq` must come
    # first (docs/clients.md says so).
    (gen / "fedq" / "__init__.py").touch()
    (gen / "fedq" / "v1" / "__init__.py").touch()
    (gen / "client.py").write_text(CLIENT)
    d = demo.dir
    r = subprocess.run(
        [
            sys.executable,
            str(gen / "client.py"),
            endpoint(demo.federation, "ngo-north"),
            "ngo-north",
            str(d / "ca" / "ca.pem"),
            str(d / "analyst" / "analyst.pem"),
            str(d / "analyst" / "analyst.key"),
        ],
        cwd=gen,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["without_override"] == "UNAVAILABLE", out
    assert out["node_name"] == "ngo-north"
    assert out["label"] == "COUNT(*)" and out["mechanism"] == "discrete_laplace"
    assert out["scale"] == 2.0 and out["half_width"] > 0
    assert len(out["values"]) == len(out["cells"]) == 4  # 3 genders + (missing)
    assert out["replayed"] == [False, True]
    assert out["retried_values"] == out["values"]
    before, after = out["spent"]
    assert abs(after - before - 0.5) < 1e-9, out  # spent once, not twice
    assert out["bad_id"][0] == "INVALID_ARGUMENT" and "query_id" in out["bad_id"][1]
