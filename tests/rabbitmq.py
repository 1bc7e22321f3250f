"""A real RabbitMQ broker for tests: Debian's rabbitmq-server on 127.0.0.1, free ports, its own directories.

    with Broker(tmp_path) as broker:
        broker.url               # amqp://guest:guest@127.0.0.1:PORT/
        broker.restart()         # the broker application stops (every connection drops) and starts again

The Erlang VM takes tens of seconds to start on two cores, so tests share one broker per session (the
`rabbitmq` fixture in tests/jobs/conftest.py) and give each test its own queues. Nothing here touches the
machine's own RabbitMQ: the node name, the AMQP, distribution and epmd ports, the data, log and config files
and the Erlang cookie (HOME) are all the broker's own, and it is stopped (epmd too) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from tests.server import free_port

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # Debian's; /usr/sbin's wrapper would `su rabbitmq`
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")
START_TIMEOUT_S = 240.0


class BrokerError(RuntimeError):
    pass


class Broker:
    def __init__(self, base: Path) -> None:
        if not SERVER.exists() or not CTL.exists():
            raise BrokerError(
                f"RabbitMQ is not installed ({SERVER} is missing): run scripts/setup, which installs Debian's "
                "rabbitmq-server"
            )
        self.base = base
        self.port = free_port()
        self.node = f"ember-test-{os.getpid()}@localhost"
        epmd_port, dist_port = free_port(), free_port()
        for folder in ("home", "mnesia", "log"):
            (base / folder).mkdir(parents=True, exist_ok=True)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (base / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(base / "home"),  # the Erlang cookie lives here, shared with rabbitmqctl
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def start(self) -> Broker:
        log = (self.base / "server.out").open("ab")
        self.process = subprocess.Popen(
            [str(SERVER)], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._wait_until(self._accepts, "start")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        epmd = shutil.which("epmd")
        if epmd:  # the broker started its own epmd on its own port: stop that one
            subprocess.run([epmd, "-kill"], env=self.env, capture_output=True, timeout=30, check=False)

    def restart(self, down_seconds: float = 2.0) -> None:
        """Stop the broker application (connections drop, the port closes), wait, start it again."""
        self.ctl("stop_app")
        if self._accepts():
            raise BrokerError("the broker still accepts connections after stop_app")
        time.sleep(down_seconds)
        self.ctl("start_app")
        self._wait_until(self._accepts, "start again")

    def ctl(self, *args: str) -> str:
        result = subprocess.run(
            [str(CTL), "-q", "-n", self.node, *args], env=self.env, capture_output=True, timeout=120, check=False
        )
        if result.returncode != 0:
            raise BrokerError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.decode()[-2000:]}")
        return result.stdout.decode()

    def _accepts(self) -> bool:
        with socket.socket() as probe:
            probe.settimeout(1)
            return probe.connect_ex(("127.0.0.1", self.port)) == 0

    def _wait_until(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            if self.process is not None and self.process.poll() is not None:
                raise BrokerError(f"rabbitmq-server exited ({self.process.returncode}); see {self.base}/server.out")
            if time.monotonic() > deadline:
                raise BrokerError(f"rabbitmq-server did not {what} within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.2)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
