"""A researcher's session with fedq in Python, cell by cell (``# %%``
marks a notebook cell: Jupyter, VS Code and Spyder run it as one).

Start the demo federation first, in another terminal, from the repository:

    cargo run --release --bin fedq -- demo --dir ./demo-federation --serve

then run this script (or open it as a notebook) with the package installed
(``pip install ./python`` or ``maturin develop -m python/Cargo.toml``):

    python python/examples/notebook.py demo-federation/federation.toml

Every query spends privacy budget on every node that answers (the demo's
analyst may spend 10 per node); a dry run spends nothing.
"""

# %%
import sys

import pandas as pd

import fedq

path = sys.argv[1] if len(sys.argv) > 1 else "demo-federation/federation.toml"
fed = fedq.Federation(path)
print(fed)

# %% What can be asked: every dataset's columns and their public domains.
schema = fed.schema()
cases = schema[(schema["node"] == schema["node"].iloc[0]) & (schema["dataset"] == "cases")]
print(cases[["column", "type", "domain", "min", "max"]].to_string(index=False))

# %% Plan before spending: the expected 95% interval at epsilon 0.5.
plan = fed.query(
    "SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender",
    epsilon=0.5,
    dry_run=True,
)
print(plan.to_string(index=False))

# %% The same query for real: a DataFrame with 95% intervals.
df = fed.query(
    "SELECT gender, COUNT(*) FROM cases WHERE isForcedLabour = 1 GROUP BY gender",
    epsilon=0.5,
)
print(df.to_string(index=False))
print(fedq.nodes_of(df)[["node", "status", "cost", "remaining_for_analyst"]].to_string(index=False))

# %% Distributions: the median and 0.9 quantile of months in trafficking.
months = fed.query(
    "SELECT gender, MEDIAN(traffickMonths), QUANTILE(traffickMonths, 0.9) FROM cases GROUP BY gender",
    epsilon=1.0,
)
wide = months.pivot(index="gender", columns="aggregate", values=["value", "ci_low", "ci_high"])
print(wide.to_string())

# %% Shares with intervals, computed by the coordinator (no extra cost).
share = fed.query(
    "SELECT ageBroad, ROUND(AVG(isForcedLabour), 3) FROM cases GROUP BY ageBroad",
    epsilon=0.5,
)
print(share.to_string(index=False))

# %% A chart, when matplotlib is installed: bars with their 95% intervals.
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("(pip install matplotlib for the chart)")
else:
    shown = df[df["value"] > 0]
    ax = shown.plot.barh(
        x="gender",
        y="value",
        xerr=[shown["value"] - shown["ci_low"], shown["ci_high"] - shown["value"]],
        legend=False,
    )
    ax.set_xlabel("victims in forced labour (noisy count, 95% CI)")
    plt.tight_layout()
    plt.savefig("forced-labour-by-gender.png")
    print("chart: forced-labour-by-gender.png")

# %% What is left to spend on each node.
budget = fed.budget()
print(budget[["node", "dataset", "spent_by_you", "remaining_for_you"]].to_string(index=False))

# %% Mistakes are said once, before anything is spent.
try:
    fed.query("SELECT gendr, COUNT(*) FROM cases GROUP BY gendr", epsilon=0.5)
except fedq.QueryError as e:
    print(f"QueryError: {e}")

assert isinstance(df, pd.DataFrame)
