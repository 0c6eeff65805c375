"""The option machinery the command-line tools share: broker connection options."""

from __future__ import annotations

import pytest

from flora.broker import cli as aggregator_cli
from flora.edge import cli as agent_cli
from flora.edge.mqtt import BrokerConfig, BrokerConfigError

CONNECTION = ["--broker", "mqtts://broker.example:8884", "--username", "dev-1", "--password", "pw",
              "--tls-ca", "{ca}", "--session-expiry-s", "120"]


def _parsed(command, argv):
    parser = agent_cli.build_parser() if command != "aggregator" else aggregator_cli.build_parser()[0]
    return parser.parse_args([command if command != "aggregator" else "run", *argv])


def test_every_tool_that_connects_reads_the_same_broker_options(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("not checked here")
    argv = [a.format(ca=ca) for a in CONNECTION]
    agent = BrokerConfig.from_args(_parsed("run", argv))
    aggregator = BrokerConfig.from_args(_parsed("aggregator", argv))
    assert agent == aggregator == BrokerConfig("broker.example", 8884, True, "dev-1", "pw", str(ca), None, None,
                                               30, 120)
    doctor = BrokerConfig.from_args(_parsed("doctor", argv[:-2]), session_expiry_s=0)  # a probe: no session
    assert doctor == BrokerConfig("broker.example", 8884, True, "dev-1", "pw", str(ca), None, None, 30, 0)
    with pytest.raises(SystemExit):  # the doctor leaves no session behind, so it has no such option
        _parsed("doctor", argv)


@pytest.mark.parametrize("argv, message", [
    ([], "missing --broker"),
    (["--broker", "ftp://h"], "must start with mqtt:// or mqtts://"),
    (["--broker", "mqtt://h", "--tls-ca", "/nonexistent/ca.crt"], "TLS CA file /nonexistent/ca.crt does not exist"),
    (["--broker", "mqtt://h", "--tls-cert", "{ca}"], "a TLS client certificate needs its key"),
    (["--broker", "mqtt://h", "--session-expiry-s", "-1"], "session expiry must be >= 0"),
])
def test_unusable_connection_options_are_refused_with_the_reason(argv, message, tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    argv = [a.format(ca=tmp_path / "ca.crt") for a in argv]
    for command in ("run", "aggregator"):
        with pytest.raises(BrokerConfigError, match=message):
            BrokerConfig.from_args(_parsed(command, argv))
