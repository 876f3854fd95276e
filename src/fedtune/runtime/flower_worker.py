"""A long-lived process that runs fedtune's ClientApp for one SuperNode: the model is loaded once per run.

By default (``--isolation subprocess``) a flwr 1.42 SuperNode starts ``flower-superexec``, which starts
a new ``flwr-clientapp`` process for every message; that process handles one message and exits
(``flwr.supernode.runtime.run_clientapp``), so each message pays for importing torch, transformers and
peft and for loading the model and data again (10-25 s on a busy 2-core machine; ~49 s of a ~50 s round
on tiny-llama). Flower's warm executors exist only for its Kubernetes executor and other task types.

With ``flower-supernode --isolation process`` the SuperNode runs no executor itself and waits for an
outside process to take its tasks from its Runtime API. This module is that process, for fedtune's
ClientApp only: it polls ``AcquireTask`` for ``flwr-clientapp`` tasks and runs each one in this process
with the same calls ``flwr-clientapp`` makes (pull the message and context with the task's token, call the
ClientApp, push the reply and the context, heartbeats while it runs), so `fedtune.runtime.flower`'s
per-process client cache (`flower.client_for`: one client per Flower run) serves every message of a run.
Everything else is Flower's: the SuperNode still talks to the SuperLink (TLS, node authentication), and
Flower's node state (``Context.state``) is still where a stateful client keeps its state between messages.

    flower-supernode --isolation process --port 9094 ...       # the Runtime API on 127.0.0.1:9094
    python -m fedtune.runtime.flower_worker --runtime-api-address 127.0.0.1:9094 --insecure

Tasks of another Flower app (a run whose FAB is not ``deploy/flower``, ``fab_id`` `FAB_ID`) are refused with
an error reply: this process runs no code but fedtune's.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
import traceback
from logging import ERROR, INFO

from flwr.app import Message as FlowerMessage
from flwr.app.error import Error
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.logger import log
from flwr.common.serde import context_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

FAB_ID = "fedtune/fedtune-flower"
"""``publisher/name`` of the Flower app in deploy/flower (its pyproject.toml): the only app this worker runs."""

PULL_TIMEOUT_S = 600.0
"""Longest wait for a task's message to be available on the SuperNode. A message whose run stopped while
the SuperNode was receiving it never becomes available (flwr 1.42 leaves its task pending); its task fails
after this long, in its own thread, without holding up the tasks behind it."""

_APP_LOCK = threading.Lock()
"""One ClientApp call at a time: they share the process's model (and Flower's process-wide `TaskIdentity`)."""


def _client(address: str, root_certificates: bytes | None, component: str, token: str | None = None):
    interceptors = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=root_certificates is None,
                                                 root_certificates=root_certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def pull_task(client: RuntimeHttpClient):
    """The task's (task id, message, context, run) from the SuperNode: flwr-clientapp's ``pull_task_input``,
    with a bounded wait for the message and without setting the process-wide `TaskIdentity` yet."""
    res = client.PullTaskInput(PullTaskInputRequest())
    context, run = context_from_proto(res.context), run_from_proto(res.run)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the SuperNode holds no message for this task")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=FlowerMessage, max_time=PULL_TIMEOUT_S)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as flwr-clientapp: the id is not in the content
    return res.task_id, message, context, run


def run_task(address: str, token: str, root_certificates: bytes | None = None) -> str:
    """Run one ClientApp task in this process, as ``flwr-clientapp --token`` would; returns its final status."""
    from .flower import client_app  # fedtune's ClientApp

    client = _client(address, root_certificates, "flwr-clientapp", token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    message = context = reply = None
    status, details = SubStatus.FAILED, "the fedtune worker failed before running the ClientApp"
    try:
        task_id, message, context, run = pull_task(client)
        if run.fab_id != FAB_ID:
            raise ValueError(f"this worker runs only fedtune's Flower app ({FAB_ID}), not {run.fab_id!r}")
        with _APP_LOCK:
            TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run.run_id, context.node_id
            reply = client_app(message=message, context=context)
        status, details = SubStatus.COMPLETED, ""
    except Exception as err:  # reported to the SuperNode as this message's error, like flwr-clientapp does
        log(ERROR, "fedtune worker: task failed: %s\n%s", err, traceback.format_exc(limit=5))
        details = f"{type(err).__name__}: {err}"
        if message is not None:
            reply = FlowerMessage(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
    finally:
        # The heartbeat stops first: once the task's output is pushed its token is gone, and a heartbeat
        # then would make flwr signal this whole process (see `_on_sigint`). Each push is guarded alone,
        # so a failed reply still ends the task and nothing is left running.
        heartbeat.stop()
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as err:
            log(ERROR, "fedtune worker: the reply could not be pushed: %s", err)
        try:
            push_task_output(client, context, status, details)
        except Exception as err:
            log(ERROR, "fedtune worker: the task's end could not be pushed: %s", err)
        finally:
            client.close()
    return status


_running = 0  # tasks running now (`_run_logged`), read by `_on_sigint`
_running_lock = threading.Lock()


def _track(delta: int) -> None:
    global _running
    with _running_lock:
        _running += delta


def _on_sigint(signum, frame) -> None:
    """flwr's task code stops a task by signalling its process (SIGINT, made for one process per task): a
    heartbeat the SuperNode refuses, or a 401 on a task token that is gone. In this process that would
    end every later task too, so while a task runs SIGINT is logged and ignored (the task fails on its own
    error); with none running it stops the worker as usual. SIGTERM always stops it."""
    with _running_lock:
        busy = _running
    if busy:
        log(INFO, "fedtune worker: SIGINT while %d task(s) run (flwr stopping a task?): ignored; "
                  "stop the worker with SIGTERM", busy)
        return
    raise KeyboardInterrupt


def _run_logged(address: str, token: str, task_id: int, root_certificates: bytes | None) -> None:
    started = time.monotonic()
    _track(+1)
    try:
        status = run_task(address, token, root_certificates)
    finally:
        _track(-1)
    log(INFO, "fedtune worker: task %d %s in %.2f s", task_id, status, time.monotonic() - started)


def serve(address: str, root_certificates: bytes | None = None, poll: float = 0.1) -> None:
    """Take the SuperNode's ClientApp tasks, forever.

    Each task runs in a thread of its own (its ClientApp call under `_APP_LOCK`), so one whose message
    never arrives cannot hold up the next; the SuperNode itself passes one message at a time.
    """
    # The training stack is imported now, while there is nothing to do (~10 s of torch/transformers/peft
    # on a busy machine), not when the first message of a run is waiting; the model needs the run's config.
    from .. import experiment  # noqa: F401
    from . import flower  # noqa: F401

    client = _client(address, root_certificates, "SuperExec")
    log(INFO, "fedtune worker: serving ClientApp tasks of the SuperNode at %s", address)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        while True:
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as err:  # the SuperNode restarting, a refused call: poll again, never exit
                log(ERROR, "fedtune worker: asking the SuperNode for a task failed: %s", err)
                time.sleep(max(poll, 1.0))
                continue
            if res.HasField("task") and res.token:
                threading.Thread(target=_run_logged, args=(address, res.token, res.task.task_id, root_certificates),
                                 name=f"task-{res.task.task_id}", daemon=True).start()
            else:
                time.sleep(poll)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fedtune.runtime.flower_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True,
                   help="host:port of the SuperNode's Runtime API (flower-supernode --port; on the same machine)")
    tls = p.add_mutually_exclusive_group(required=True)
    tls.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (the SuperNode's default)")
    tls.add_argument("--root-certificates", help="CA (PEM) of the Runtime API's certificate (flower-supernode "
                                                 "--ssl-certfile/--ssl-keyfile)")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between polls when there is no task (0.1)")
    a = p.parse_args(argv)
    if a.poll <= 0:
        p.error(f"--poll {a.poll} must be a positive number of seconds")
    certs = None
    if a.root_certificates:
        with open(a.root_certificates, "rb") as f:
            certs = f.read()
    serve(a.runtime_api_address, certs, a.poll)


if __name__ == "__main__":
    main()
