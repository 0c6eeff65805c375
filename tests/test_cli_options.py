"""The machinery the command-line tools share: broker connection options, config files checked against
the parsers, FloraError and its exit statuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from flora.broker import cli as aggregator_cli
from flora.edge import cli as agent_cli
from flora.edge.config import Bounded, CommandParser, ConfigError, add_config_option, apply_config, config_keys
from flora.edge.errors import EXIT_BAD_INPUT, EXIT_QUORUM, EXIT_UNAVAILABLE, FloraError
from flora.edge.mqtt import BrokerConfig, BrokerConfigError

CONNECTION = ["--broker", "mqtts://broker.example:8884", "--username", "dev-1", "--password", "pw",
              "--tls-ca", "{ca}", "--session-expiry-s", "120"]


def _parsed(command, argv):
    parser = agent_cli.build_parser() if command != "aggregator" else aggregator_cli.build_parser()
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


# -- config files: keys, types and precedence come from the parsers --------------------------------
@pytest.fixture
def agent_main(monkeypatch, capsys, tmp_path):
    """flora-agent run with a config file, stopped before any work: (status, parsed args or stderr)."""
    seen = []
    monkeypatch.setattr(agent_cli, "run_agent", lambda args: seen.append(args) or 0)

    def main(toml: str, *argv: str):
        seen.clear()
        (tmp_path / "agent.toml").write_text(toml)
        code = agent_cli.main(["--config", str(tmp_path / "agent.toml"), *argv])
        return code, seen[0] if seen else capsys.readouterr().err

    return main


REQUIRED = 'bundle = "/b"\ndata = "/d"\nbroker = "mqtt://h"\nclient_id = "dev-1"\n'


@pytest.mark.parametrize("line, message", [
    ('threads = "four"', "config key threads must be an integer, got 'four'"),
    ("threads = 2.5", "config key threads must be an integer, got 2.5"),
    ("threads = true", "config key threads must be an integer, got True"),
    ("threads = 0", "config key threads must be >= 1, got 0"),
    ("val_fraction = 1", "config key val_fraction must be >= 0 and < 1, got 1"),
    ('val_fraction = "0.1"', "config key val_fraction must be a number, got '0.1'"),
    ('fp16_updates = "yes"', "config key fp16_updates must be true or false, got 'yes'"),
    ('backend = "gpu"', "config key backend must be one of auto, ort-training, step, got 'gpu'"),
    ("state_dir = 3", "config key state_dir must be a path (a string), got 3"),
    ("providers = [1, 2]", "config key providers must be a list of strings or a comma-separated string"),
    ('log_level = "info"', "config key log_level must be one of DEBUG, INFO, WARNING, ERROR, got 'info'"),
    ('tls-kye = "k"', "config file has unknown keys ['tls_kye']"),
    ('config = "other.toml"', "config file has unknown keys ['config']"),
])
def test_config_values_are_checked_against_the_options_types(line, message, agent_main):
    code, err = agent_main(REQUIRED + line + "\n")
    assert code == 2 and err.startswith("flora-agent: error: ") and message in err, err


def test_config_values_become_what_the_command_line_would_give(agent_main):
    code, args = agent_main(REQUIRED + 'providers = ["cuda", "cpu"]\nval_fraction = 0\n'
                            'state-dir = "/s"\nthreads = 3\nfp16_updates = true\n')
    assert code == 0
    assert args.bundle == Path("/b") and args.state_dir == Path("/s") and args.providers == ["cuda", "cpu"]
    assert args.val_fraction == 0.0 and isinstance(args.val_fraction, float) and args.threads == 3
    assert args.fp16_updates is True and args.seed == 0  # not in the file: the parser's default
    code, args = agent_main(REQUIRED + 'providers = "tensorrt, cuda"\n', "--providers", "cpu")
    assert args.providers == ["cpu"]  # the command line wins
    code, args = agent_main(REQUIRED + 'providers = "tensorrt, cuda"\n')
    assert args.providers == ["tensorrt", "cuda"]


def test_a_new_option_is_a_config_key_with_its_type_and_precedence():
    parser = CommandParser(prog="tool")
    add_config_option(parser)
    group = parser.add_argument_group("new")
    group.add_argument("--max-widgets", type=Bounded(int, minimum=1), default=4)
    group.add_mutually_exclusive_group().add_argument("--fast", action="store_true")
    assert config_keys(parser) == ["max_widgets", "fast"]
    args = parser.parse_args([])
    assert apply_config(parser, args, [], {"max_widgets": 9, "fast": True}).max_widgets == 9
    argv = ["--max-widgets", "4"]  # equal to the default, and still given: it wins over the file
    assert apply_config(parser, parser.parse_args(argv), argv, {"max_widgets": 9}).max_widgets == 4
    with pytest.raises(ConfigError, match="config key max_widgets must be >= 1, got 0"):
        apply_config(parser, args, [], {"max_widgets": 0})
    with pytest.raises(SystemExit):  # the same bound on the command line
        parser.parse_args(["--max-widgets", "0"])


def test_the_doctor_reads_the_agents_config_file_and_refuses_keys_neither_knows(tmp_path, monkeypatch, capsys):
    import flora.edge.doctor as doctor

    seen = []
    monkeypatch.setattr(doctor, "run_doctor", lambda args: seen.append(args) or 0)
    config = tmp_path / "agent.toml"
    config.write_text(REQUIRED + 'federation = "home"\nthreads = 2\nfp16_updates = true\n')
    assert agent_cli.main(["doctor", "--config", str(config)]) == 0
    args = seen[0]
    assert (args.bundle, args.broker, args.federation, args.threads) == (Path("/b"), "mqtt://h", "home", 2)
    assert not hasattr(args, "data") and not hasattr(args, "fp16_updates")  # run's keys: skipped
    config.write_text(REQUIRED + "batch_sise = 8\n")
    assert agent_cli.main(["doctor", "--config", str(config)]) == 2
    assert "config file has unknown keys ['batch_sise']" in capsys.readouterr().err


# -- errors: FloraError and its exit codes; anything else is a bug and shows as one ------------------
def test_the_aggregator_exits_with_each_errors_own_status_and_lets_bugs_through(tmp_path, monkeypatch, capsys):
    from flora.broker import aggregator
    from flora.broker.checkpoint import CheckpointError
    from flora.broker.rounds import QuorumError
    from flora.edge.synthetic import synthetic_manifest, write_bundle

    monkeypatch.setattr(aggregator_cli.signal, "signal", lambda *args: None)  # keep pytest's SIGINT handler
    bundle = write_bundle(tmp_path / "bundle", synthetic_manifest())
    argv = ["--bundle", str(bundle), "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path / "s")]
    for error, code in ((CheckpointError("disk"), 3), (QuorumError("quorum"), 4), (ConnectionError("net"), 3)):
        monkeypatch.setattr(aggregator.Aggregator, "run", lambda self, e=error: (_ for _ in ()).throw(e))
        assert aggregator_cli.main(argv) == code
        assert capsys.readouterr().err.endswith(f"flora-aggregator: error: {error}\n")
    monkeypatch.setattr(aggregator.Aggregator, "run", lambda self: {}["a programming error"])
    with pytest.raises(KeyError):
        aggregator_cli.main(argv)
    monkeypatch.setattr(aggregator_cli, "_load_inputs", lambda args: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):  # not "bad arguments": a traceback
        aggregator_cli.main(argv)


def test_every_error_class_is_a_flora_error_with_the_documented_status():
    from flora.broker.checkpoint import CheckpointError
    from flora.broker.mosquitto import MosquittoError
    from flora.broker.rounds import QuorumError
    from flora.edge.adapter import AdapterError
    from flora.edge.bundle import BundleError
    from flora.edge.dataset import DatasetError
    from flora.edge.mqtt import ConnectionFailed, NotAuthorised
    from flora.edge.preprocess import ImageError
    from flora.edge.protocol import ProtocolError
    from flora.edge.state import StateError
    from flora.edge.trainers import TrainerError

    for cls in (ConfigError, BundleError, DatasetError, BrokerConfigError, StateError, TrainerError, AdapterError,
                ProtocolError, ImageError, NotAuthorised):
        assert issubclass(cls, FloraError) and cls.exit_code == EXIT_BAD_INPUT, cls
    for cls in (CheckpointError, MosquittoError, ConnectionFailed):
        assert issubclass(cls, FloraError) and cls.exit_code == EXIT_UNAVAILABLE, cls
    assert issubclass(QuorumError, FloraError) and QuorumError.exit_code == EXIT_QUORUM == 4
    assert (EXIT_BAD_INPUT, EXIT_UNAVAILABLE) == (2, 3)
    assert issubclass(ConnectionFailed, ConnectionError) and issubclass(NotAuthorised, ConnectionError)


# -- --version and the default command's --help -------------------------------------------------------
@pytest.mark.parametrize("module, prog", [("flora.edge.cli", "flora-agent"), ("flora.broker.cli", "flora-aggregator"),
                                          ("flora.export.cli", "flora-export"), ("flora.sim.cli", "flora-sim")])
def test_every_tool_answers_version(module, prog, capsys):
    import importlib

    from flora.edge import __version__

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"{prog} {__version__}\n"


@pytest.mark.parametrize("main, shows", [
    (agent_cli.main, ["--bundle", "--data", "--client-id", "--broker", "--tls-ca", "--val-fraction", "doctor"]),
    (aggregator_cli.main, ["--bundle", "--rounds", "--min-clients", "--broker", "--tls-ca", "--session-expiry-s"]),
])
def test_help_shows_the_default_commands_options(main, shows, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and all(option in out for option in shows), out


# -- checked before any heavy work ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--partition", "dirichlet:-1"], "unknown partition scheme 'dirichlet:-1'"),
    (["--partition", "shards"], "unknown partition scheme 'shards'"),
    (["--clients", "0"], "--clients must be >= 1, got 0"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--val-fraction", "1"], "--val-fraction must be >= 0 and < 1, got 1.0"),
    (["--model", "clip-huge"], "unknown model 'clip-huge'"),
])
def test_flora_sim_refuses_bad_options_before_writing_data_or_exporting(argv, message, tmp_path, monkeypatch,
                                                                         capsys):
    from flora.sim import cli as sim_cli
    from flora.sim import run as sim_run

    def heavy(*args, **kwargs):
        raise AssertionError("data or a bundle was prepared before the options were checked")

    monkeypatch.setattr(sim_run, "prepare_data", heavy)
    monkeypatch.setattr(sim_run, "prepare_bundle", heavy)
    assert sim_cli.main([*argv, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("flora-sim: error: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra, message", [
    (["--broker", "mqtts://h", "--tls-ca", "/nonexistent/ca.crt"], "TLS CA file /nonexistent/ca.crt does not exist"),
    (["--broker", "ftp://h"], "must start with mqtt:// or mqtts://"),
    (["--broker", "mqtt://h", "--tls-key", "{key}"], "a TLS client certificate needs its key"),
])
def test_the_agent_checks_the_broker_and_tls_files_before_loading_anything(extra, message, tmp_path, monkeypatch,
                                                                           capsys):
    from flora.edge.agent import Agent

    monkeypatch.setattr(Agent, "open", classmethod(lambda cls, cfg: pytest.fail("the agent started loading")))
    (tmp_path / "k.pem").write_text("key")
    argv = ["--bundle", str(tmp_path / "bundle"), "--data", str(tmp_path / "images"), "--client-id", "dev-1",
            *[a.format(key=tmp_path / "k.pem") for a in extra]]
    assert agent_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("flora-agent: error: ") and message in err, err


def test_repeatable_options_count_as_given_and_keep_their_values():
    from flora.edge.config import explicit_options

    parser = aggregator_cli.build_parser()
    argv = ["run", "--bundle", "b", "--strategy", "fedadam", "--strategy-option", "server_lr=0.01", "tau=0.001",
            "--strategy-option", "beta1=0.8"]
    args = parser.parse_args(argv)
    run = parser.commands["run"]
    assert "strategy_option" in explicit_options(run, argv[1:])
    assert "strategy_option" not in explicit_options(run, argv[1:5])
    got = apply_config(run, args, argv[1:], {})
    assert got.strategy_option == ["server_lr=0.01", "tau=0.001", "beta1=0.8"]
