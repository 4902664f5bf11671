"""Synthetic provenance data for bench/lineage.py and bench/patterns.py, loaded with COPY.

Ledger rows are COPY text lines in usage.rows.ROW_COLUMNS order (what the flush writes), tree
edges are provenance_provenancerelationship rows, both as ingestion leaves them: a root has depth
0 and an empty root_request_id; a child names its parent, its root and its depth, and has one
`is_tree` edge (child -> parent, type = its relationship, source "event"). Request ids are
random hex (not sequential), costs are exact token x price products. All lines are built (as
bytes) before anything is timed, so a COPY's time is the server's alone.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import _harness as h

sys.path.insert(1, str(h.REPO))  # usage.rows: plain Python, no Django needed
from usage.rows import ROW_COLUMNS, ROW_INDEX

TENANT = "org"
EDGE_TABLE = "provenance_provenancerelationship"
EDGE_COLUMNS = (
    "tenant", "from_request_id", "to_request_id", "type", "is_tree", "source", "created_at",
    "created_by",
)  # fmt: skip
CYCLE_TABLE = "provenance_cycleattempt"
CYCLE_COLUMNS = (
    "tenant", "from_request_id", "to_request_id", "type", "path", "source", "attempted_at",
    "attempted_by",
)  # fmt: skip
LEDGER_TABLE = "usage_tokenusage"

# Price per token in units of 1e-10 USD (the ledger's scale): input, output.
MODELS = {
    "gpt-4o-mini": ("openai", 1_500, 6_000),
    "gpt-4o": ("openai", 25_000, 100_000),
    "claude-3-5-sonnet": ("anthropic", 30_000, 150_000),
    "claude-3-5-haiku": ("anthropic", 8_000, 40_000),
}


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    agent_type: str
    model: str
    task_type: str
    workflow_step: str
    error_rate: float
    cache_rate: float  # share of its requests answered from a cache (cache_hit true)
    latency_ms: int  # mean
    tokens_in: int  # mean
    tokens_out: int


# name, agent_type, model, task_type, workflow_step, error rate, cache rate, mean latency ms,
# mean input tokens, mean output tokens
_AGENT_TABLE = """
router     orchestrator gpt-4o-mini       question  route    0.002 0.05 350  900  60
planner    planner      gpt-4o            plan      plan     0.01  0.02 2200 2500 400
retriever  tool         gpt-4o-mini       search    retrieve 0.02  0.30 600  1500 120
coder      worker       claude-3-5-sonnet code      execute  0.04  0.0  5200 6000 1800
executor   tool         gpt-4o-mini       tool_call execute  0.08  0.0  900  700  90
critic     reviewer     claude-3-5-haiku  review    review   0.01  0.10 1400 3000 300
summarizer worker       claude-3-5-haiku  summarize answer   0.005 0.15 1100 4000 500
guard      guardrail    gpt-4o-mini       moderate  check    0.001 0.40 200  800  10
"""
AGENTS = {
    f[0]: Agent(
        f[0], f[1], f[2], f[3], f[4], float(f[5]), float(f[6]), int(f[7]), int(f[8]), int(f[9])
    )
    for f in (line.split() for line in _AGENT_TABLE.strip().splitlines())
}
CHILD_AGENTS = ("planner", "retriever", "coder", "executor", "critic", "summarizer", "guard")
CHILD_RELATIONSHIPS = (
    ("triggered_by", 0.6), ("tool_call_of", 0.25), ("part_of", 0.1), ("derived_from", 0.05),
)  # fmt: skip
TEAMS = ("search", "support", "research", "platform", "growth")


def _rid(rng: random.Random) -> str:
    return f"req_{rng.getrandbits(96):024x}"


def _money(units: int) -> str:
    return f"{units // 10**10}.{units % 10**10:010d}"


def _ts(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class Ledger:
    """Ledger rows and edges, built as COPY text lines."""

    def __init__(self, seed: int, tenant: str = TENANT):
        self.rng = random.Random(seed)
        self.tenant = tenant
        self.rows: list[str] = []
        self.edges: list[str] = []
        self.cycles: list[str] = []
        base = [""] * len(ROW_COLUMNS)
        defaults = {
            "cache_read_tokens": "0", "cache_write_tokens": "0", "currency": "USD",
            "price_source": "catalogue", "unpriced": "f", "estimated": "f", "metadata": "{}",
            "cache_hit": "\\N", "system_context": "{}", "tenant": tenant, "status": "success",
        }  # fmt: skip
        for name, value in defaults.items():
            base[ROW_INDEX[name]] = value
        self._base = base

    def add(
        self,
        at: float,
        agent: Agent,
        *,
        parent: str = "",
        root: str = "",
        depth: int = 0,
        relationship: str = "",
        input_hash: str = "",
        model: str | None = None,
        status: str | None = None,
        cache_hit: bool | None = None,
        team: str = "search",
        user: str = "",
        conversation: str = "",
        workflow: str = "",
        rid: str | None = None,
    ) -> str:
        """Append one row (and its tree edge when it has a parent); returns its request_id."""
        rng = self.rng
        rid = rid or _rid(rng)
        model = model or agent.model
        provider, p_in, p_out = MODELS[model]
        tin = max(1, int(rng.expovariate(1 / agent.tokens_in)))
        tout = max(1, int(rng.expovariate(1 / agent.tokens_out)))
        if status is None:
            status = "error" if rng.random() < agent.error_rate else "success"
        if cache_hit is None and agent.cache_rate:
            cache_hit = rng.random() < agent.cache_rate
        c_in, c_out = tin * p_in, tout * p_out
        if cache_hit:
            c_in //= 10
        f = self._base.copy()
        f[0] = rid
        f[1] = _ts(at)
        f[2] = _ts(at + 0.05 + rng.random() * 0.5)
        f[3], f[4] = provider, model
        f[5], f[6] = str(tin), str(tout)
        f[9], f[10], f[11] = _money(c_in + c_out), _money(c_in), _money(c_out)
        f[_PRICE_REF] = f"genai-prices:{provider}/{model}"
        f[_TEAM] = team
        f[_PROJECT] = f"{team}-{rng.randrange(4)}"
        f[_USER] = user
        f[_FEATURE] = "assistant"
        f[_AGENT], f[_TASK] = agent.name, agent.task_type
        f[_CONV], f[_WORKFLOW] = conversation, workflow
        f[_STATUS] = status
        if status == "error":
            f[_ERROR_TYPE] = "rate_limit" if rng.random() < 0.6 else "timeout"
        f[_LATENCY] = str(max(20, int(rng.gauss(agent.latency_ms, agent.latency_ms / 3))))
        f[_PARENT], f[_ROOT], f[_REL] = parent, root, relationship
        f[_INPUT_HASH] = input_hash
        if cache_hit is not None:
            f[_CACHE_HIT] = "t" if cache_hit else "f"
        f[_DEPTH] = str(depth)
        f[_AGENT_TYPE], f[_STEP] = agent.agent_type, agent.workflow_step
        self.rows.append("\t".join(f))
        if parent:
            self.edge(rid, parent, relationship or "triggered_by", tree=True, at=at)
        return rid

    def edge(self, frm: str, to: str, type_: str, *, tree: bool, at: float) -> None:
        source = "event" if tree else "api"
        self.edges.append(
            f"{self.tenant}\t{frm}\t{to}\t{type_}\t{'t' if tree else 'f'}\t{source}\t{_ts(at)}\t"
        )

    def cycle(self, path: list[str], type_: str, at: float) -> None:
        as_json = "[" + ",".join(f'"{p}"' for p in path) + "]"
        self.cycles.append(
            f"{self.tenant}\t{path[0]}\t{path[1]}\t{type_}\t{as_json}\tapi\t{_ts(at)}\tbench"
        )


_PRICE_REF, _TEAM, _PROJECT, _USER = (
    ROW_INDEX[c] for c in ("price_ref", "team_id", "project_id", "user_id")
)
_FEATURE, _AGENT, _TASK, _CONV, _WORKFLOW = (
    ROW_INDEX[c] for c in ("feature", "agent", "task_type", "conversation_id", "workflow_id")
)
_STATUS, _ERROR_TYPE, _LATENCY = (ROW_INDEX[c] for c in ("status", "error_type", "latency_ms"))
_PARENT, _ROOT, _REL = (
    ROW_INDEX[c] for c in ("parent_request_id", "root_request_id", "relationship")
)
_INPUT_HASH, _CACHE_HIT, _DEPTH = (ROW_INDEX[c] for c in ("input_hash", "cache_hit", "depth"))
_AGENT_TYPE, _STEP = ROW_INDEX["agent_type"], ROW_INDEX["workflow_step"]


def pick(rng: random.Random, weighted: Iterable[tuple[str, float]]) -> str:
    x, last = rng.random(), ""
    for value, weight in weighted:
        last = value
        x -= weight
        if x < 0:
            return value
    return last


# --- shapes ---------------------------------------------------------------------------------------


def fanout_tree(
    n_nodes: int, max_depth: int, fan: tuple[int, int], rng: random.Random
) -> list[tuple[int, int]]:
    """(parent index, depth) per node, root (-1, 0) first, parents before children: n_nodes
    nodes in levels 1..max_depth sized like a bell (most nodes in the middle levels), each
    internal node with fan[0]..fan[1] children (where the level sizes allow it)."""
    lo, hi = fan
    weights = [(d**2.2) * (0.62**d) for d in range(1, max_depth + 1)]
    scale = (n_nodes - 1) / sum(weights)
    sizes = [max(1, round(w * scale)) for w in weights]
    sizes[sizes.index(max(sizes))] += (n_nodes - 1) - sum(sizes)
    # A level can be at most a typical fan-out times the one above: the excess goes deeper.
    for d in range(len(sizes) - 1):
        cap = round((lo + hi) / 2 * (sizes[d - 1] if d else 1))
        if sizes[d] > cap:
            excess, sizes[d] = sizes[d] - cap, cap
            below = sum(sizes[d + 1 :])
            for j in range(d + 1, len(sizes)):
                sizes[j] += excess * sizes[j] // below
            sizes[sizes.index(max(sizes))] += (n_nodes - 1) - sum(sizes)
    nodes: list[tuple[int, int]] = [(-1, 0)]
    level = [0]
    for depth, size in enumerate(sizes, start=1):
        # as many parents as a typical fan-out needs, within what the level sizes allow
        want = round(size / ((lo + hi) / 2))
        m = max(1, min(len(level), max(-(-size // hi), min(want, size // lo))))
        counts = [min(lo, size // m)] * m
        for _ in range(size - sum(counts)):
            open_ = [i for i, c in enumerate(counts) if c < hi] or list(range(m))
            counts[rng.choice(open_)] += 1
        nxt: list[int] = []
        for parent, k in zip(rng.sample(level, m), counts, strict=True):
            for _ in range(k):
                nxt.append(len(nodes))
                nodes.append((parent, depth))
        level = nxt
    return nodes


# --- COPY ---------------------------------------------------------------------------------------


def encode(lines: list[str], chunk_rows: int = 20_000) -> list[bytes]:
    return [
        ("\n".join(lines[i : i + chunk_rows]) + "\n").encode()
        for i in range(0, len(lines), chunk_rows)
    ]


def copy_in(conn: Any, table: str, columns: Iterable[str], chunks: list[bytes]) -> float:
    """COPY pre-encoded text chunks into `table` in one transaction; returns the seconds."""
    cur = conn.cursor()
    t = time.perf_counter()
    with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
        for chunk in chunks:
            cp.write(chunk)
    conn.commit()
    return time.perf_counter() - t


def vacuum_analyze(stack: h.Stack) -> float:
    """VACUUM (ANALYZE) the provenance tables: statistics, visibility map and hint bits as
    autovacuum would have left them on a live ledger (and no autovacuum during the timing)."""
    t = time.perf_counter()
    with stack.pg(autocommit=True) as conn:
        for table in (LEDGER_TABLE, EDGE_TABLE, CYCLE_TABLE):
            conn.execute(f"VACUUM (ANALYZE) {table}")
    return time.perf_counter() - t


def table_sizes(stack: h.Stack) -> str:
    with stack.pg() as conn:
        ledger, edges = conn.execute(
            "SELECT pg_size_pretty(pg_total_relation_size(%s)), "
            "pg_size_pretty(pg_total_relation_size(%s))",
            (LEDGER_TABLE, EDGE_TABLE),
        ).fetchone()
    return f"ledger {ledger}, edges {edges} (tables with their indexes)"


# --- a week of agent traffic --------------------------------------------------------------------


@dataclass(slots=True)
class Plan:
    """What `workload` put in, to compare with what the analysis finds."""

    rows: int = 0
    trees: int = 0
    duplicates: int = 0  # rows repeating an earlier row's input_hash + model within the window
    storms: int = 0
    storm_retries: int = 0
    single_retries: int = 0
    deep_trees: int = 0  # agent loops
    trees_past_deep_limit: int = 0  # agent loops and chains of retries, deeper than 8
    rows_past_deep_limit: int = 0
    fanout_parents: int = 0
    cycles: int = 0
    max_depth: int = 0
    trimmed: int = 0  # rows of the last tree dropped to make exactly n_rows (counted above)


class Workload:
    """A week of agent traffic: user questions (root requests) and the trees they cause.

    Most trees are small (a router, 1-5 children, fewer grandchildren, depth <= 4); and spread
    through the range: retry storms (`storms` operations retried 3-8 times within minutes, half
    as a chain of retries of retries), deep agent loops (1 % of trees, depth 9-12, past the deep
    chain limit 8), fan-out outliers (`fanout` parents with 50-200 children), single retries
    of failed requests, `dup_share` of all rows repeating a recent row's input (same hash and
    model, seconds to minutes later; some of them cache hits with a cached_from edge), and a
    few refused cycles (CycleAttempt rows)."""

    DEEP_LIMIT = 8
    DUP_WINDOW_S = 3000.0  # under the endpoint's default window (3600 s)

    def __init__(
        self,
        led: Ledger,
        n_rows: int,
        t0: float,
        t1: float,
        *,
        storms: int = 200,
        fanout: int = 20,
        deep_share: float = 0.01,
        dup_share: float = 0.05,
        cycles: int = 30,
    ):
        self.led, self.rng, self.n_rows, self.t0, self.t1 = led, led.rng, n_rows, t0, t1
        self.deep_share = deep_share
        self.hashed_share = 0.8
        # Of the rows that carry a hash, this many repeat a recent one: dup_share of all rows.
        self.p_dup = dup_share / self.hashed_share
        self.recent: list[tuple[str, str, float, str]] = []  # (input_hash, model, at, id)
        rng = self.rng
        self.events = sorted(
            [(rng.random(), "storm") for _ in range(storms)]
            + [(rng.random(), "fanout") for _ in range(fanout)]
            + [(rng.random(), "cycle") for _ in range(cycles)]
        )
        self.plan = Plan()
        self.first = len(led.rows)
        self.deep_roots: set[str] = set()

    # --- pieces --------------------------------------------------------------------------------

    def _hash(self, at: float, model: str) -> tuple[str, str, str]:
        """(input_hash, model, the request it repeats or "") of a new row: mostly a fresh
        input, sometimes a recent row's (its model too)."""
        rng = self.rng
        if self.recent and rng.random() < self.p_dup:
            h_, m, prev_at, prev = self.recent[-1 - rng.randrange(min(50, len(self.recent)))]
            if 0 <= at - prev_at < self.DUP_WINDOW_S:
                self.plan.duplicates += 1
                return h_, m, prev
        return f"{rng.getrandbits(256):064x}", model, ""

    def node(
        self,
        at: float,
        agent: Agent,
        tree: dict[str, Any],
        *,
        parent: str = "",
        depth: int = 0,
        relationship: str = "",
        status: str | None = None,
        hashed: bool | None = None,
    ) -> str:
        rng = self.rng
        if hashed is None:
            hashed = rng.random() < 0.75
        input_hash, model, repeats = (
            self._hash(at, agent.model) if hashed else ("", agent.model, "")
        )
        cache_hit = True if repeats and rng.random() < 0.3 else None
        rid = self.led.add(
            at, agent, parent=parent, root=tree["root"], depth=depth,
            relationship=relationship if parent else "", input_hash=input_hash, model=model,
            status=status, cache_hit=cache_hit, team=tree["team"], user=tree["user"],
            conversation=tree["conv"], workflow=tree["workflow"],
        )  # fmt: skip
        if cache_hit:
            self.led.edge(rid, repeats, "cached_from", tree=False, at=at)
        if input_hash and not repeats:
            self.recent.append((input_hash, model, at, rid))
            if len(self.recent) > 200:
                del self.recent[:100]
        self.plan.max_depth = max(self.plan.max_depth, depth)
        if depth > self.DEEP_LIMIT:
            self.plan.rows_past_deep_limit += 1
            self.deep_roots.add(tree["root"])
        return rid

    def _tree(self, at: float) -> tuple[dict[str, Any], str]:
        rng = self.rng
        tree: dict[str, Any] = {
            "root": "", "team": TEAMS[rng.randrange(len(TEAMS))],
            "user": f"u{rng.randrange(5000)}", "conv": f"conv_{rng.getrandbits(48):012x}",
            "workflow": f"wf_{rng.getrandbits(48):012x}",
        }  # fmt: skip
        root = self.node(at, AGENTS["router"], tree, hashed=True)
        tree["root"] = root
        self.plan.trees += 1
        return tree, root

    def _child_agent(self) -> Agent:
        return AGENTS[CHILD_AGENTS[self.rng.randrange(len(CHILD_AGENTS))]]

    def _maybe_retry(self, at: float, tree: dict[str, Any], rid: str, depth: int) -> None:
        # A failed request is retried once half of the time (not a storm).
        if self.rng.random() < 0.5:
            self.node(at + 2, AGENTS["executor"], tree, parent=rid, depth=depth + 1,
                      relationship="retry_of", status="success")  # fmt: skip
            self.plan.single_retries += 1

    def normal(self, at: float) -> None:
        rng = self.rng
        tree, root = self._tree(at)
        todo = [(root, 0, at)]
        p_children = (1.0, 0.35, 0.2, 0.1)
        while todo:
            parent, depth, p_at = todo.pop()
            if depth >= len(p_children) or rng.random() >= p_children[depth]:
                continue
            for _ in range(rng.randint(1, 5) if depth == 0 else rng.randint(1, 3)):
                c_at = p_at + rng.uniform(0.1, 4.0)
                agent = self._child_agent()
                status = "error" if rng.random() < agent.error_rate else "success"
                rel = pick(rng, CHILD_RELATIONSHIPS)
                rid = self.node(c_at, agent, tree, parent=parent, depth=depth + 1,
                                relationship=rel, status=status)  # fmt: skip
                if status == "error":
                    self._maybe_retry(c_at, tree, rid, depth + 1)
                todo.append((rid, depth + 1, c_at))

    def deep(self, at: float) -> None:
        """An agent loop: planner -> coder -> critic -> coder -> ... 9 to 12 deep."""
        rng = self.rng
        tree, parent = self._tree(at)
        self.plan.deep_trees += 1
        loop = ("planner", "coder", "critic", "coder", "executor", "critic")
        for depth in range(1, rng.randint(9, 12) + 1):
            at += rng.uniform(0.5, 8.0)
            agent = AGENTS[loop[(depth - 1) % len(loop)]]
            parent_next = self.node(at, agent, tree, parent=parent, depth=depth,
                                    relationship="triggered_by", status="success")  # fmt: skip
            if depth < 12 and rng.random() < 0.2:  # a side call off the loop
                self.node(at + 0.3, AGENTS["retriever"], tree, parent=parent_next,
                          depth=depth + 1, relationship="tool_call_of")  # fmt: skip
            parent = parent_next

    def storm(self, at: float) -> None:
        """One tool call retried 3-8 times within minutes (a chain or a star of retries)."""
        rng = self.rng
        tree, root = self._tree(at)
        at += rng.uniform(0.2, 2.0)
        op = self.node(at, AGENTS["executor"], tree, parent=root, depth=1,
                       relationship="tool_call_of", status="error")  # fmt: skip
        chain = rng.random() < 0.5
        retries = rng.randint(3, 8)
        prev, depth = op, 1
        for k in range(retries):
            at += rng.uniform(5, 60)
            last = k == retries - 1
            status = "success" if last and rng.random() < 0.7 else "error"
            parent, pdepth = (prev, depth) if chain else (op, 1)
            prev = self.node(at, AGENTS["executor"], tree, parent=parent, depth=pdepth + 1,
                             relationship="retry_of", status=status)  # fmt: skip
            depth = pdepth + 1
        self.plan.storms += 1
        self.plan.storm_retries += retries

    def fanout(self, at: float) -> None:
        rng = self.rng
        tree, root = self._tree(at)
        planner = self.node(at + 1, AGENTS["planner"], tree, parent=root, depth=1,
                            relationship="triggered_by")  # fmt: skip
        for _ in range(rng.randint(50, 200)):
            self.node(at + rng.uniform(2, 60), AGENTS["executor"], tree, parent=planner,
                      depth=2, relationship="tool_call_of")  # fmt: skip
        self.plan.fanout_parents += 1

    def cycle(self, at: float) -> None:
        ids = [line.split("\t", 1)[0] for line in self.led.rows[-self.rng.randint(2, 4) :]]
        self.led.cycle([*ids, ids[0]], "derived_from", at)
        self.plan.cycles += 1

    # --- the whole range -----------------------------------------------------------------------

    def run(self) -> Plan:
        rng, led = self.rng, self.led
        events = self.events
        while (made := len(led.rows) - self.first) < self.n_rows:
            done = made / self.n_rows
            at = self.t0 + done * (self.t1 - self.t0)
            if events and events[0][0] <= done:
                kind = events.pop(0)[1]
                getattr(self, kind)(at)
            elif rng.random() < self.deep_share:
                self.deep(at)
            else:
                self.normal(at)
        self._trim()
        self.plan.rows = len(led.rows) - self.first
        self.plan.trees_past_deep_limit = len(self.deep_roots)
        return self.plan

    def _trim(self) -> None:
        """Drop the last tree's tail past n_rows (children come after their parents, so no
        row left names a dropped one as parent) and the edges that name a dropped row."""
        led = self.led
        extra = len(led.rows) - self.first - self.n_rows
        if extra <= 0:
            return
        self.plan.trimmed = extra
        dropped = {line.split("\t", 1)[0] for line in led.rows[-extra:]}
        del led.rows[-extra:]
        led.edges = [e for e in led.edges if not dropped.intersection(e.split("\t", 3)[1:3])]
