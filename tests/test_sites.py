"""Site aggregation over real mosquitto bridges: two site brokers bridged to a root broker (the template in
devices/mosquitto/), a site aggregator and three devices per site, the root aggregator folding the sites'
partials: the root's global is the flat FedAvg of all six updates; a site that dies mid-round is handled
by the root's quorum and timeout like a device."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from bench.fleet import ADAPTERS, _flat, expected_global, fleet_manifest
from bench.fleet_devices import FEDERATION as SITE_FEDERATION
from bench.fleet_devices import device_id
from flora.broker.checkpoint import Checkpoint
from flora.broker.mosquitto import Mosquitto, start_mosquitto
from flora.edge.synthetic import write_bundle

from .helpers import REPO

pytestmark = pytest.mark.mqtt
ROOT_FEDERATION = "world"
TEMPLATE = REPO / "devices" / "mosquitto" / "bridge.conf.template"
LOOPBACK_ONLY = ("remote_password", "bridge_cafile", "bridge_insecure", "remote_username")


def bridge_lines(site: str, root: Mosquitto) -> List[str]:
    """The template rendered as the README says, less its TLS and password lines (a loopback test broker)."""
    values = {"@SITE@": site, "@SITE_FEDERATION@": SITE_FEDERATION, "@FEDERATION@": ROOT_FEDERATION,
              "@ROOT@": f"{root.host}:{root.port}", "@CONFIG_DIR@": "/nonexistent"}
    lines = []
    for line in TEMPLATE.read_text().splitlines():
        for key, value in values.items():
            line = line.replace(key, value)
        if line.strip() and not line.startswith("#") and not line.startswith(LOOPBACK_ONLY):
            lines.append(line)
    assert "@" not in "".join(lines)
    return lines


def aggregator(args: List[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flora.broker.cli", *args], cwd=REPO,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


def devices(url: str, manifest_file: Path, first: int, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.fleet_devices", "--url", url, "--manifest",
                             str(manifest_file), "--first", str(first), "--count", "3", "--dtype", "float32",
                             "--timeout", "120", "--out", str(out)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=(out.parent / f"{out.stem}.log").open("wb"), start_new_session=True)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


class Fleet:
    """A root broker and two bridged site brokers, their aggregators and devices; everything stopped at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: List[subprocess.Popen] = []
        self.manifest = fleet_manifest("tiny")
        self.bundle = write_bundle(tmp / "bundle", self.manifest)
        self.root = start_mosquitto(tmp / "root", anonymous=True)  # loopback; the bridge lines carry no password
        self.sites: Dict[str, Mosquitto] = {}
        for site in ("site-a", "site-b"):
            self.sites[site] = start_mosquitto(tmp / site, extra_config=bridge_lines(site, self.root), anonymous=True)

    def start_root(self, *extra: str) -> subprocess.Popen:
        args = ["--bundle", str(self.bundle), "--broker", self.root.url, "--federation", ROOT_FEDERATION,
                "--sites", "site-a,site-b", "--state-dir", str(self.tmp / "root-state"), "--rounds", "1", *extra]
        self.procs.append(aggregator(args, self.tmp / "root.log"))
        return self.procs[-1]

    def start_site(self, site: str, *extra: str) -> subprocess.Popen:
        url = self.sites[site].url
        args = ["--role", "site", "--bundle", str(self.bundle), "--broker", url, "--federation", SITE_FEDERATION,
                "--upstream", url, "--upstream-federation", ROOT_FEDERATION, "--site-id", site,
                "--state-dir", str(self.tmp / f"{site}-state"), "--wait-for-clients", "3", "--round-timeout", "60",
                *extra]
        self.procs.append(aggregator(args, self.tmp / f"{site}.log"))
        return self.procs[-1]

    def start_devices(self, site: str, first: int) -> subprocess.Popen:
        self.procs.append(devices(self.sites[site].url, self.bundle / "manifest.json", first,
                                  self.tmp / f"devices-{site}.json"))
        return self.procs[-1]

    def root_global(self) -> np.ndarray:
        state = json.loads((self.tmp / "root-state" / "state.json").read_text())
        return _flat((self.tmp / "root-state" / state["global_file"]).read_bytes(), self.manifest)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for broker in (self.root, *self.sites.values()):
            broker.stop()


@pytest.fixture
def fleet(mosquitto_binary, tmp_path):
    f = Fleet(tmp_path)
    yield f
    f.stop()


def test_the_root_global_is_the_flat_fedavg_of_every_device_behind_both_sites(fleet):
    root = fleet.start_root("--wait-for-clients", "2", "--min-clients", "2", "--round-timeout", "60")
    for site, first in (("site-a", 0), ("site-b", 3)):
        fleet.start_site(site, "--min-clients", "3")
        fleet.start_devices(site, first)
    assert root.wait(90) == 0, fleet.log("root")
    (row,) = Checkpoint(fleet.tmp / "root-state").history()
    weight = {c: 100 + i % 4 for c, i in ((device_id(i), i) for i in range(6))}
    assert row["reported"] == {"site-a": sum(weight[device_id(i)] for i in range(3)),
                               "site-b": sum(weight[device_id(i)] for i in range(3, 6))}
    expected = expected_global(fleet.manifest, ADAPTERS["tiny"]["dtype"], [device_id(i) for i in range(6)])
    np.testing.assert_allclose(fleet.root_global(), expected, rtol=0, atol=1e-7)
    for site in ("site-a", "site-b"):  # each site reported its own three devices' updates, once
        (site_row,) = Checkpoint(fleet.tmp / f"{site}-state").history()
        assert site_row["role"] == "site" and site_row["num_reported"] == 3 and site_row["num_rejected"] == 0


def test_a_site_that_dies_mid_round_is_left_out_by_the_root_at_its_deadline(fleet):
    root = fleet.start_root("--wait-for-clients", "2", "--min-clients", "1", "--round-timeout", "12")
    fleet.start_site("site-a", "--min-clients", "3")
    doomed = fleet.start_site("site-b", "--min-clients", "4")  # three devices: its round cannot close early
    fleet.start_devices("site-a", 0)
    fleet.start_devices("site-b", 3)
    journal = fleet.tmp / "site-b-state" / "spool" / "round-000000" / "round.json"
    wait_for(journal.exists, 60, "site-b's local round")
    time.sleep(1.0)  # its devices' updates arrive
    doomed.kill()  # dies mid-round: its last will (offline) crosses the bridge to the root
    assert root.wait(90) == 0, fleet.log("root")
    (row,) = Checkpoint(fleet.tmp / "root-state").history()
    assert set(row["reported"]) == {"site-a"} and row["num_asked"] == 2
    assert row["wall_time_s"] >= 11.0  # closed at the deadline with its quorum, not before
    assert "client site-b is offline" in (fleet.tmp / "root.log").read_text()  # its will crossed the bridge
    expected = expected_global(fleet.manifest, ADAPTERS["tiny"]["dtype"], [device_id(i) for i in range(3)])
    np.testing.assert_allclose(fleet.root_global(), expected, rtol=0, atol=1e-7)
