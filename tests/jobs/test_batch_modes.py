"""The same 20 prompts (temperature 0) in this process, through a server, and on a local Ray cluster with two
worker nodes give identical answers. The Ray run ships the model through the object store (--ray-ship), so the
answers also prove the copy each node wrote is the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember.cli.main import main
from tests.server import running_server

OPTIONS = ["--lines", "--temp", "0", "--repeat-penalty", "1", "-n", "6", "-np", "2"]


def answers(path: Path) -> dict[str, str]:
    result = {}
    for text in path.read_text().splitlines():
        line = json.loads(text)
        assert line["response"]["status_code"] == 200, line
        result[line["custom_id"]] = line["response"]["body"]["choices"][0]["message"]["content"]
    return result


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray head on 127.0.0.1 and a second worker node, each with one CPU; only its own processes are stopped."""
    # Keep Ray on the loopback address (on Linux it would advertise the machine's network address); read at import.
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray  # installed by scripts/setup (the ember[ray] extra)
    from ray import cluster_utils

    for attempt in range(3):  # Ray gives a node 30 s to start; a very busy machine may need a second try
        cluster = cluster_utils.Cluster()
        try:
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", include_dashboard=False)  # the head
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
            cluster.wait_for_nodes()
            break
        except Exception:
            cluster.shutdown()
            if attempt == 2:
                raise
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_in_process_server_and_ray_give_identical_outputs(tmp_path, monkeypatch, ray_cluster) -> None:
    prompts = tmp_path / "twenty.txt"
    prompts.write_text("".join(f"Give one word that rhymes with number {i}.\n" for i in range(20)))
    local, served, spread = tmp_path / "local.jsonl", tmp_path / "served.jsonl", tmp_path / "ray.jsonl"
    assert main(["batch", str(prompts), "-o", str(local), *OPTIONS, "-t", "1"]) == 0
    with running_server(home=tmp_path / "server-home", num_parallel=2) as base:
        monkeypatch.setenv("EMBER_HOST", base.removeprefix("http://"))
        assert main(["batch", str(prompts), "-o", str(served), *OPTIONS, "--server"]) == 0
    assert (
        main(
            ["batch", str(prompts), "-o", str(spread), *OPTIONS, "-t", "1", "--ray", ray_cluster.address, "--ray-ship"]
        )
        == 0
    )
    expected = answers(local)
    assert len(expected) == 20 and all(text.strip() for text in expected.values())
    assert answers(served) == expected
    assert answers(spread) == expected
