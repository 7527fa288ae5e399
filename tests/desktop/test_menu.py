"""The menu model is a pure function of the snapshot: what each kind of node shows."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from desktoptools import (
    CA_FINGERPRINT,
    NOW,
    ca_snapshot,
    make_request,
    member_snapshot,
    unconfigured_snapshot,
)

from koi_tray.compose.status import HookView
from koi_tray.desktop import menu as m
from koi_tray.desktop.icons import IconState

UTC = dt.UTC


def visible_text(model: m.MenuModel) -> list[str]:
    return [item.text for item in model.items if item.visible and item.kind != m.SEPARATOR]


def test_ca_menu_shows_mesh_certificate_members_and_posture() -> None:
    model = m.build_menu(ca_snapshot(), autostart=False, tz=UTC)

    assert model.find("role").text == f"CA of mesh {CA_FINGERPRINT[:16]} · ca-host"
    assert model.find("leaf").text == "Certificate for ca-host: 89 days left (until 2027-02-28)"
    assert (
        model.find("renewal_last").text
        == "Last renewal check: OK, not due yet at 08:57 (3 min ago)"
    )
    assert model.find("renewal_next").text == "Next check: 09:57 (in 57 min)"
    assert model.find("bundle").text == "Trust bundle: seq 3, published here"
    members = model.find("members")
    assert members.text == "Members: 2 active"
    assert [child.text for child in members.children] == [
        "node-02 — active, until 2027-02-19",
        "node-03 — active, until 2027-02-19",
    ]
    assert model.find("enrollment").text == "Enrollment: open · approval required"
    assert model.find("ca_key").text == "CA key: unlocked"
    assert model.icon_state is IconState.OK
    assert model.tooltip == "koi-tray ca ca-host · certificate 89 days left"


def test_ca_bundle_line_shows_the_age_of_the_last_roster_change_when_known() -> None:
    snapshot = ca_snapshot()
    changed = dataclasses.replace(snapshot.bundle, received_at=NOW - dt.timedelta(hours=5))

    model = m.build_menu(dataclasses.replace(snapshot, bundle=changed), tz=UTC)

    assert model.find("bundle").text == "Trust bundle: seq 3, published here (changed 5 h ago)"


def test_ca_actions_offer_invite_but_not_unlock() -> None:
    model = m.build_menu(ca_snapshot(), autostart=True)

    assert model.find(m.INVITE).visible and model.find(m.INVITE).enabled
    assert not model.find(m.UNLOCK).visible
    assert model.find(m.RENEW).enabled
    assert model.find(m.COPY_FINGERPRINT).enabled
    approvals = model.find(m.APPROVALS)
    assert approvals.visible and not approvals.enabled
    assert approvals.text == "Approvals… (none waiting)"
    assert model.find(m.AUTOSTART).checked


def test_pending_approvals_are_listed_with_their_codes_and_badge_the_icon() -> None:
    first = make_request("node-07", seconds=120, now=NOW)
    second = make_request("nas", seconds=30, now=NOW)
    model = m.build_menu(ca_snapshot(pending=(first, second)))

    approvals = model.find(m.APPROVALS)
    assert approvals.enabled
    assert approvals.text == "Approvals… (2 waiting)"
    assert [(c.key, c.arg) for c in approvals.children] == [
        (m.APPROVAL, first.request_id),
        (m.APPROVAL, second.request_id),
    ]
    assert approvals.children[0].text == "node-07 from 192.0.2.10 · code 947 171 · 2 min left"
    assert approvals.children[1].text.endswith("30 s left")
    assert model.pending == 2
    assert "2 approval(s) waiting" in model.tooltip


def test_member_menu_names_its_ca_and_hides_ca_lines() -> None:
    model = m.build_menu(member_snapshot(), tz=UTC)

    assert model.find("role").text == f"Member of mesh {CA_FINGERPRINT[:16]} · CA ca-host:5641"
    assert model.find("leaf").text.startswith("Certificate for node-02: 60 days left")
    assert model.find("renewal_last").text.startswith("Last renewal check: renewed at 08:58")
    assert model.find("bundle").text == "Trust bundle: seq 4, received 3 min ago"
    for key in ("members", "enrollment", "ca_key", m.INVITE, m.UNLOCK, m.APPROVALS):
        assert not model.find(key).visible, key
    assert model.icon_state is IconState.OK


def test_unconfigured_node_offers_no_certificate_actions() -> None:
    model = m.build_menu(unconfigured_snapshot())

    assert visible_text(model)[0] == "Not in a mesh yet · laptop"
    assert not model.find("leaf").visible
    assert not model.find("renewal_last").visible
    assert not model.find(m.RENEW).enabled
    assert not model.find(m.COPY_FINGERPRINT).enabled
    assert model.find(m.QUIT).enabled
    assert model.icon_state is IconState.IDLE
    assert model.tooltip == "koi-tray: not in a mesh"


def test_locked_ca_offers_unlock_and_asks_for_attention() -> None:
    model = m.build_menu(ca_snapshot(locked=True))

    unlock = model.find(m.UNLOCK)
    assert unlock.visible and unlock.enabled
    assert model.find("ca_key").text == "CA key: LOCKED (use Unlock CA…)"
    assert "unlock it with the passphrase" in model.find("ca_key").tooltip
    assert model.icon_state is IconState.ATTENTION
    assert "CA locked" in model.tooltip


def test_revoked_member_says_so_everywhere() -> None:
    model = m.build_menu(member_snapshot(revoked=True))

    assert model.find("leaf").text == "Certificate: REVOKED by the CA"
    assert model.find("bundle").text == "Trust bundle: seq 4, 1 revoked, received 3 min ago"
    assert model.icon_state is IconState.CRITICAL
    assert "REVOKED" in model.tooltip


def test_failing_renewal_shows_count_and_reason() -> None:
    detail = "no answer from https://ca-host:5642/v1/certmesh/renew: connection refused"
    model = m.build_menu(member_snapshot(failures=3, detail=detail), tz=UTC)

    assert model.find("renewal_last").text.startswith(
        "Last renewal check: FAILED (3× in a row) at 08:58"
    )
    line = model.find("renewal_detail")
    assert line.visible and line.text.strip() == detail
    assert model.find("renewal_next").text == "Next check: 09:01 (in 60 s)"
    assert model.icon_state is IconState.ATTENTION
    assert "renewal failing (3×)" in model.tooltip


def test_unreachable_ca_shows_offline_icon() -> None:
    model = m.build_menu(member_snapshot(failures=1, reachable=False, detail="refused"))

    assert model.icon_state is IconState.OFFLINE
    assert model.find("renewal_last").text.startswith("Last renewal check: FAILED at")


def test_expiring_certificate_counts_days() -> None:
    model = m.build_menu(member_snapshot(days=1))

    assert "1 day left" in model.find("leaf").text


def test_a_due_certificate_that_did_not_renew_is_overdue() -> None:
    snapshot = member_snapshot(days=20, failures=2, detail="refused")
    last_renewed = NOW - dt.timedelta(days=70)  # the renewal that issued this leaf
    failing = m.build_menu(
        dataclasses.replace(
            snapshot, renewal=dataclasses.replace(snapshot.renewal, last_renewed_at=last_renewed)
        )
    )
    renewing = m.build_menu(member_snapshot(days=89))

    assert failing.find("leaf").text.endswith("20 days left (until 2026-12-21), renewal OVERDUE")
    assert "OVERDUE" not in renewing.find("leaf").text


def test_the_reload_hook_result_is_shown_after_a_renewal() -> None:
    def with_hook(success: bool, output: str):
        hook = HookView("/usr/local/bin/reload-web", success, output, NOW - dt.timedelta(minutes=2))
        snapshot = member_snapshot()
        return dataclasses.replace(
            snapshot, renewal=dataclasses.replace(snapshot.renewal, last_hook=hook)
        )

    quiet = m.build_menu(member_snapshot(), tz=UTC).find("renewal_hook")
    good = m.build_menu(with_hook(True, ""), tz=UTC).find("renewal_hook")
    bad = m.build_menu(with_hook(False, "nginx: config test failed"), tz=UTC).find("renewal_hook")

    assert not quiet.visible
    assert good.visible and good.text == "Reload hook: OK at 08:58"
    assert bad.text == "Reload hook FAILED at 08:58: nginx: config test failed"
    assert bad.tooltip == "/usr/local/bin/reload-web"


def test_a_stopped_renewal_loop_says_so() -> None:
    snapshot = member_snapshot()
    stopped = dataclasses.replace(
        snapshot, renewal=dataclasses.replace(snapshot.renewal, loop_stopped=True)
    )

    model = m.build_menu(stopped)

    assert model.find("renewal_last").text.startswith("Renewal STOPPED on an error")
    assert model.icon_state is IconState.ATTENTION


def test_starting_menu_has_only_quit_and_folders() -> None:
    model = m.build_menu(None, autostart=None)

    assert visible_text(model)[0] == "Starting…"
    assert [i.key for i in model.status_lines()] == ["role"]
    enabled = {i.key for i in model.actions() if i.enabled and i.visible}
    assert enabled == {m.OPEN_CERTS, m.OPEN_LOG, m.QUIT}
    assert model.icon_state is IconState.IDLE
    assert model.tooltip == "koi-tray: starting…"


def test_busy_renewal_is_shown_and_not_offered_twice() -> None:
    model = m.build_menu(member_snapshot(), busy=frozenset({m.RENEW}))

    assert model.find(m.RENEW).text == "Renewing…"
    assert not model.find(m.RENEW).enabled


SCENARIOS = {
    "starting": None,
    "unconfigured": unconfigured_snapshot(),
    "ca": ca_snapshot(),
    "ca-locked": ca_snapshot(locked=True),
    "ca-pending": ca_snapshot(pending=(make_request(now=NOW),)),
    "member": member_snapshot(),
    "member-failing": member_snapshot(failures=2, detail="refused"),
    "member-revoked": member_snapshot(revoked=True),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_menu_has_the_same_keys_and_kinds(name: str) -> None:
    reference = [(i.key, i.kind) for i in m.build_menu(SCENARIOS["ca"]).items]
    model = m.build_menu(SCENARIOS[name])

    assert [(i.key, i.kind) for i in model.items] == reference
