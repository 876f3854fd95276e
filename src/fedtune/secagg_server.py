"""The server side of secure aggregation: one round of Flower's ``SecAggPlusWorkflow`` over a fedtune `Grid`.

`SecAggServer.round` replaces a round's plain exchange and average (see `fedtune.secagg` for the protocol and
what each side sees). Flower's workflow drives the four stages through `_Bridge`, a Flower ``Grid`` whose
``send_and_receive`` packs each Flower message into a fedtune message (`secagg._pack`), sends the stage to
every live client through the paradigm's grid, and unpacks the replies; a failed client becomes a Flower
error reply, which the workflow treats as a dropout. The legacy ``Strategy`` calls the workflow makes
(`_Capture`) only hand it the round's ``fit_ins`` and keep the unmasked mean; fedtune's own strategy then
takes that mean as the round's average (`rounds.aggregate`).

Everything the server receives is checked before Flower's code reads it: a stage reply must be one
Flower ``RecordDict``, and a masked vector must be int64 arrays of the expected shapes, else the client
counts as dropped at that stage. A workflow that still fails (a malformed key share, too few live clients)
ends the round without aggregating: the previous global adapter is kept and the round record says why.
"""

from __future__ import annotations

import io
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Metadata, RecordDict
from flwr.app.message import make_message
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.common.logger import FLOWER_LOGGER
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid as FlowerGrid
from flwr.supercore.task_identity import TaskIdentity

from .grid import Grid, is_error
from .rounds import aggregate, screen_metrics
from .secagg import FIT_TYPE, MODULUS, NODE_OFFSET, SecAggConfig, _pack, _unpack, resolved_shares
from .wire import Message, WireError, encode, encoded_size

State = dict[str, torch.Tensor]


class _Proxy:
    """What the workflow reads of a legacy ``ClientProxy``: its node id."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.cid = str(node_id)


class _Manager:
    """What the workflow reads of a legacy ``ClientManager``: how many clients are available (for its log)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def num_available(self) -> int:
        return self.n


class _Capture:
    """The legacy ``Strategy`` calls of the workflow: the round's FitIns out, the unmasked mean back."""

    def __init__(self, nodes: list[int], fit_bytes: bytes) -> None:
        self.pairs = [(_Proxy(n), FitIns(Parameters([fit_bytes], FIT_TYPE), {})) for n in nodes]
        self.mean: list[np.ndarray] | None = None
        self.results: list = []

    def configure_fit(self, server_round, parameters, client_manager):
        return self.pairs

    def aggregate_fit(self, server_round, results, failures):
        # The workflow has put the unmasked mean in every result's parameters.
        self.results = results
        if not results:
            return None, {}
        self.mean = parameters_to_ndarrays(results[0][1].parameters)
        return results[0][1].parameters, {}


class _Bridge(FlowerGrid):
    """A Flower ``Grid`` over a fedtune `Grid`: each stage goes to the clients as fedtune messages."""

    def __init__(self, grid: Grid, rnd: int, shapes: list[tuple[int, ...]], advance: Callable[[int], None]) -> None:
        self.grid, self.rnd, self.advance = grid, rnd, advance
        self.shapes = [(1,), *shapes]  # Flower's weight factor, then the update's arrays
        self.bytes_down: dict[int, int] = {}
        self.bytes_up: dict[int, int] = {}
        self.dropped: dict[int, str] = {}  # client -> the stage and reason it dropped at
        self.fitres: dict[int, RecordDict] = {}
        self.clipped: dict[int, int] = {}
        self.stages: dict[str, dict[str, float]] = {}
        self.masked: dict[int, list[np.ndarray]] = {}  # what the server received at the collect stage (tests read it)

    @property
    def run(self):
        raise NotImplementedError("a secagg bridge runs one round's stages only")

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError("a secagg bridge runs one round's stages only")

    def create_message(self, *args, **kwargs):
        raise NotImplementedError("a secagg bridge runs one round's stages only")

    def get_node_ids(self):
        return [NODE_OFFSET + n for n in self.grid.node_ids()]

    def push_messages(self, messages):
        raise NotImplementedError("a secagg bridge sends and receives in one call")

    def pull_messages(self, message_ids):
        raise NotImplementedError("a secagg bridge sends and receives in one call")

    def send_and_receive(self, messages, *, timeout: float | None = None):
        messages = list(messages)
        if not messages:
            return []
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        started = time.perf_counter()
        outbound = [_pack(m.content, {"round": self.rnd, "dst": m.metadata.dst_node_id - NODE_OFFSET, "stage": stage})
                    for m in messages]
        replies = self.grid.send_and_receive(outbound, timeout)
        if stage == Stage.COLLECT_MASKED_VECTORS:
            self.advance(len(messages))
        out, down, up = [], 0, 0
        for m, sent, reply in zip(messages, outbound, replies):
            client = m.metadata.dst_node_id - NODE_OFFSET
            d, u = encoded_size(sent), 0 if is_error(reply) else encoded_size(reply)
            self.bytes_down[client] = self.bytes_down.get(client, 0) + d
            self.bytes_up[client] = self.bytes_up.get(client, 0) + u
            down, up = down + d, up + u
            try:
                if is_error(reply):
                    raise WireError(str(reply.meta.get("error", "failed"))[:300])
                content = _unpack(reply)
                if stage == Stage.COLLECT_MASKED_VECTORS:
                    self._screen_masked(client, content, reply)
            except (WireError, KeyError, TypeError, ValueError) as err:
                self.dropped.setdefault(client, f"{stage}: {err}")
                out.append(self._reply(m, error=Error(code=0, reason=str(err)[:300])))
                continue
            out.append(self._reply(m, content=content))
        self.stages[stage] = {"seconds": time.perf_counter() - started, "bytes_down": down, "bytes_up": up,
                              "clients": len(messages), "replies": len(messages) - sum(1 for r in out if r.has_error())}
        return out

    def _screen_masked(self, client: int, content: RecordDict, reply: Message) -> None:
        """A collect-stage reply must hold one int64 array per expected shape (WireError otherwise)."""
        blobs = content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        if not isinstance(blobs, list) or len(blobs) != len(self.shapes):
            raise WireError(f"masked vector has {len(blobs) if isinstance(blobs, list) else 'no'} arrays, "
                            f"expected {len(self.shapes)}")
        arrays = []
        for blob, shape in zip(blobs, self.shapes):
            if not isinstance(blob, bytes):
                raise WireError("masked vector arrays must be bytes")
            a = np.load(io.BytesIO(blob), allow_pickle=False)
            if a.dtype != np.int64 or tuple(a.shape) != tuple(shape):
                raise WireError(f"masked array of {a.dtype} {tuple(a.shape)}, expected int64 {tuple(shape)}")
            arrays.append(a)
        self.masked[client] = arrays
        self.fitres[client] = content
        clipped = reply.meta.get("secagg_clipped")
        if isinstance(clipped, int) and not isinstance(clipped, bool) and clipped >= 0:
            self.clipped[client] = clipped

    def _reply(self, m, *, content: RecordDict | None = None, error: Error | None = None):
        meta = Metadata(run_id=0, message_id="", src_node_id=m.metadata.dst_node_id, dst_node_id=m.metadata.src_node_id,
                        reply_to_message_id=m.metadata.message_id, group_id=m.metadata.group_id,
                        created_at=time.time(), ttl=m.metadata.ttl, message_type=m.metadata.message_type)
        return make_message(meta, content=content, error=error)


class SecAggServer:
    """Runs a round's secure aggregation (Flower's SecAgg+) over a fedtune `Grid`.

    Args:
        cfg: The ``secagg`` section.
        max_num_examples: W, Flower's ``max_weight``: a client weighs ``min(num_examples, W) / W``.
        timeout: Seconds each stage waits for its replies (None: the grid's default).
    """

    def __init__(self, cfg: SecAggConfig, max_num_examples: int, timeout: float | None = None) -> None:
        self.cfg = cfg
        self.max_num_examples = int(max_num_examples)
        self.timeout = timeout
        self.last: _Bridge | None = None  # the last round's bridge (bytes, stages, masked vectors): for tests

    def round(self, grid: Grid, rnd: int, chosen: list[int], global_state: State, strategy, *,
              log: Callable[[dict[str, Any]], None], advance: Callable[[int], None] = lambda n: None,
              min_replies: int = 1) -> tuple[State, int, bool, str]:
        """One secure round: ``(new global state, clients whose update is in the sum, aggregated, note)``."""
        keys = sorted(global_state)  # the order the clients put their arrays in (`SecAggClient._fit`)
        shapes = [tuple(global_state[k].shape) for k in keys]
        fit_bytes = encode(Message(global_state, {"kind": "fit_ins", "round": rnd}))
        capture = _Capture([NODE_OFFSET + n for n in chosen], fit_bytes)
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                config=ServerConfig(num_rounds=1), strategy=capture, client_manager=_Manager(len(chosen)))
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        c = self.cfg
        shares, threshold = resolved_shares(c, len(chosen))
        workflow = SecAggPlusWorkflow(c.num_shares, c.reconstruction_threshold, max_weight=float(self.max_num_examples),
                                      clipping_range=float(c.clipping_range), quantization_range=int(c.quantization_range),
                                      modulus_range=MODULUS, timeout=self.timeout)
        bridge = self.last = _Bridge(grid, rnd, shapes, advance)
        started = time.perf_counter()
        state, level, failure = random.getstate(), FLOWER_LOGGER.level, ""
        FLOWER_LOGGER.setLevel(logging.CRITICAL)  # the workflow logs every stage at INFO/ERROR; fedtune records it
        # Flower stamps the messages the workflow creates with the process's task identity, which a ServerApp
        # process has; in simulation the server is fedtune's, so it gets one for the round.
        identity = TaskIdentity._run_id is None
        if identity:
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 0, 1
        try:
            workflow(bridge, context)
        except Exception as err:  # a malformed share or key from a client must not take the server down
            failure = f"{type(err).__name__}: {err}"[:300]
        finally:
            if identity:
                TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None
            FLOWER_LOGGER.setLevel(level)
            random.setstate(state)  # the workflow shuffles the clients with the global generator
        seconds = time.perf_counter() - started
        summed = [r[0].node_id - NODE_OFFSET for r in capture.results]
        for n in chosen:
            fields = self._client_fields(bridge, n, n in summed)
            log({"type": "client", "round": rnd, "client": n, "bytes_down": bridge.bytes_down.get(n, 0),
                 "bytes_up": bridge.bytes_up.get(n, 0), **fields})
        log({"type": "secagg", "round": rnd, "sampled": len(chosen), "summed": len(summed), "num_shares": shares,
             "threshold": threshold, "seconds": seconds, "stages": bridge.stages,
             **({"error": failure} if failure else {})})
        if capture.mean is None:
            why = failure or "; ".join(f"client {k} dropped at {v}" for k, v in sorted(bridge.dropped.items()))
            return global_state, 0, False, f"secure aggregation did not complete ({why or 'no replies'}): the previous " \
                                           "global state is kept"
        if len(summed) < min_replies:
            return global_state, len(summed), False, (f"{len(summed)} updates in the secure sum, fewer than "
                                                      f"federation.min_replies = {min_replies}")
        mean = {k: (global_state[k].float() + torch.from_numpy(np.asarray(a, dtype=np.float32)).view(
            global_state[k].shape).to(global_state[k].device)) for k, a in zip(keys, capture.mean)}
        new, aggregated, note = aggregate(strategy, global_state, [(mean, 1.0)], min_replies=1)
        return new, len(summed), aggregated, note

    @staticmethod
    def _client_fields(bridge: _Bridge, n: int, summed: bool) -> dict[str, Any]:
        """A client's metrics record: its status, and what its FitRes carried in the clear (count, metrics)."""
        if n in bridge.dropped or not summed:
            return {"status": "failed", "error": bridge.dropped.get(n, "left out of the secure sum")[:500]}
        content = bridge.fitres[n]
        fields: dict[str, Any] = {"status": "ok"}
        try:
            count = content.metric_records["fitres.num_examples"]["num_examples"]
            fields["num_examples"] = int(count)
            meta = json.loads(str(content.config_records["fitres.metrics"]["fedtune"]))
            fields.update(screen_metrics(meta if isinstance(meta, dict) else {}))
        except (KeyError, TypeError, ValueError) as err:
            fields["dropped_metrics"] = {"fitres": f"unreadable: {type(err).__name__}"}
        if n in bridge.clipped:
            fields["secagg_clipped"] = bridge.clipped[n]
        return fields


def server_for(ctx) -> SecAggServer | None:
    """The run's `SecAggServer` when ``secagg.enabled`` (W defaults to the largest training partition), else None."""
    c = ctx.config.secagg
    if not c.enabled:
        return None
    w = c.max_num_examples or max(len(p) for p in ctx.data.parts)
    return SecAggServer(c, w)
