"""A leaf read on one thread never undoes an install running on another.

Reads run crash recovery; before the per-directory lock, a status refresh reading the
leaf while a renewal installed it could take the install's staging directory for the
leftovers of a crash and delete it, failing the renewal.
"""

from __future__ import annotations

import threading

from koitest import PASSPHRASE

from koi_tray.certmesh import keystore, pki
from koi_tray.certmesh.ca import PRESETS, CertificateAuthority
from koi_tray.certmesh.leafstore import LeafStore


def test_reads_during_installs_see_a_matching_pair_and_installs_all_succeed(ca_data, clock):
    ca = CertificateAuthority.create(
        ca_data,
        "ca-host",
        PASSPHRASE,
        PRESETS["just-me"],
        "Alice",
        clock=clock,
        kdf=keystore.FAST_TEST_KDF,
    )
    installer = LeafStore(ca_data.certs, "node-02")
    reader = LeafStore(ca_data.certs, "node-02")
    done = threading.Event()
    failures: list[BaseException] = []
    reads = 0

    def read_repeatedly() -> None:
        nonlocal reads
        while not done.is_set():
            try:
                leaf = reader.read()
                if leaf is not None:
                    assert pki.keys_match(leaf.key, leaf.cert)
                reads += 1
            except BaseException as exc:  # collected and re-raised below
                failures.append(exc)
                return

    thread = threading.Thread(target=read_repeatedly)
    thread.start()
    try:
        for _ in range(60):
            key = pki.generate_key()
            cert = pki.issue_leaf(
                ca._require_key(),
                ca.ca_cert,
                key.public_key(),
                "node-02",
                ["node-02"],
                clock.now(),
                ca.roster.policy.lifetime,
            )
            installer.install(key, cert, ca.ca_cert)
    finally:
        done.set()
        thread.join()

    assert not failures, failures[0]
    assert reads > 60
    assert installer.read().fingerprint == pki.fingerprint(cert)
