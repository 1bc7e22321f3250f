"""`ember batch --ray auto|ADDRESS`: the lines spread over a Ray cluster, one actor per node.

Each actor loads the model once with ember's engine and takes up to `num_parallel` lines at once (a threaded
actor, so its lines share the engine's batches as they do in one process). The driver (this process) keeps
the journal and the outputs exactly as a local run does, and hands each actor its next line as one finishes,
so fast nodes take more lines and a rerun resumes the same way.

The model reaches the nodes by a shared path when every node sees the file (same size), else through Ray's
object store: the driver puts the file in chunks, the actor writes them to a local cache and checks the size
(and the sha256 when the model came from ember's store). ember itself must be installed on every node.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from ember.errors import EmberError, InvalidRequestError
from ember.jobs.batch_input import BatchLine
from ember.jobs.batch_lines import LineResult, Translate, run_in_process
from ember.store.resolve import ModelSource, resolve_model

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 * 1024 * 1024


_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _ray(address: str) -> Any:
    if address.rsplit(":", 1)[0] in _LOOPBACK:
        # A cluster bound to the loopback address: Ray (on Linux) would replace 127.0.0.1 by this machine's network
        # address before connecting, and wait for a GCS that does not listen there. Ray reads this at import.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise EmberError("--ray needs Ray: install it with `pip install 'ember[ray]'`") from None
    return ray


class BatchActor:
    """Runs lines on one node (created by RayExecutor as a Ray actor)."""

    def __init__(self, source: ModelSource, size: int, translate: Translate, load: dict[str, Any]) -> None:
        self.source, self.size, self.translate, self.load = source, size, translate, dict(load)
        self._model: Any = None
        self._lock = threading.Lock()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def has_model(self) -> bool:
        path = self.source.path
        return path.is_file() and path.stat().st_size == self.size

    def receive_model(self, chunks: list[Any]) -> str:
        """Write the model from the object store into this node's cache; the path it now has here."""
        import ray

        cache = Path(tempfile.gettempdir()) / "ember-ray-models"
        cache.mkdir(parents=True, exist_ok=True)
        name = (self.source.digest or f"{self.source.path.name}-{self.size}").replace(":", "-")
        target = cache / (name if name.endswith(".gguf") else name + ".gguf")
        if not (target.is_file() and target.stat().st_size == self.size):
            digest = hashlib.sha256()
            fd, temporary = tempfile.mkstemp(dir=cache, prefix=".part-")
            with os.fdopen(fd, "wb") as writer:
                for ref in chunks:
                    data = ray.get(ref)
                    digest.update(data)
                    writer.write(data)
            expected = (self.source.digest or "").removeprefix("sha256:")
            if os.path.getsize(temporary) != self.size or (expected and digest.hexdigest() != expected):
                os.unlink(temporary)
                raise EmberError("the model file arrived damaged on this node (size or sha256 differs)")
            os.replace(temporary, target)
        self.source = ModelSource(**{**self.source.__dict__, "path": target})
        return str(target)

    def run(self, line: BatchLine, settings: Any) -> LineResult:
        return run_in_process(self, line, self.translate, settings)

    def get(self, name: str) -> Any:
        """The one model of a Ray run, loaded on the first line (the ModelPool protocol run_in_process uses)."""
        from ember.model import Model

        with self._lock:
            if self._model is None:
                self._model = Model(self.source, **self.load)
            return self._model


class RayExecutor:
    """Lines on actors of a Ray cluster; `concurrency` is actors x slots."""

    def __init__(
        self,
        address: str,
        translate: Translate,
        load: dict[str, Any],
        *,
        actors: int | None = None,
        ship: bool = False,
        model: str | None = None,
    ) -> None:
        from ember.config import Settings

        self.ray = ray = _ray(address)
        self.translate, self.load, self.ship, self.model_name = translate, dict(load), ship, model
        self.wanted_actors = actors
        self.settings = Settings()
        self.slots = int(load.get("num_parallel", self.settings.num_parallel))
        try:
            ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise EmberError(f"cannot connect to a Ray cluster at {address!r}: {error}") from None
        self.nodes = [node for node in ray.nodes() if node.get("Alive")]
        if not self.nodes:
            raise EmberError(f"the Ray cluster at {address!r} has no live node")
        self.actors: list[Any] = []
        self._local = threading.local()
        self._next = itertools.count()
        self._started = threading.Lock()

    @property
    def concurrency(self) -> int:
        return (self.wanted_actors or len(self.nodes)) * self.slots

    def start(self, lines: list[BatchLine]) -> None:
        """Create the actors on the model the lines name (one model per Ray run) and get it to every node."""
        names = {self.model_name or line.body.get("model") for line in lines}
        if len(names) != 1 or None in names:
            raise InvalidRequestError("with --ray every line must name the same model; pass -m MODEL")
        source = resolve_model(names.pop())
        size = source.path.stat().st_size
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        remote = self.ray.remote(BatchActor)
        count = self.wanted_actors or len(self.nodes)
        for index in range(count):
            node = self.nodes[index % len(self.nodes)]["NodeID"]
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
            self.actors.append(
                remote.options(max_concurrency=self.slots, num_cpus=0, scheduling_strategy=strategy).remote(
                    source, size, self.translate, self.load
                )
            )
        present = self.ray.get([actor.has_model.remote() for actor in self.actors])
        missing = [actor for actor, has in zip(self.actors, present, strict=True) if self.ship or not has]
        if missing:
            chunks = []
            with source.path.open("rb") as reader:
                while data := reader.read(CHUNK_BYTES):
                    chunks.append(self.ray.put(data))
            paths = self.ray.get([actor.receive_model.remote(chunks) for actor in missing])
            log.info("shipped the model to %d actor(s) through the object store: %s", len(missing), paths)

    def __call__(self, line: BatchLine) -> LineResult:
        actor = getattr(self._local, "actor", None)
        if actor is None:  # each worker thread keeps one actor: `slots` threads per actor
            actor = self._local.actor = self.actors[next(self._next) % len(self.actors)]
        return self.ray.get(actor.run.remote(line, self.settings))

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors.clear()
        self.ray.shutdown()
