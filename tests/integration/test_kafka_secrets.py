"""Secrets in the librdkafka properties file (X2X_KAFKA_CONFIG) never show: not in what
the CLI prints, not in its -v logs, not in a settings object's repr. Run against an
unreachable bootstrap and against the real broker (which does not speak SASL, so both
runs fail: the failure paths are where secrets usually leak)."""
from __future__ import annotations

import pytest

from tests.conftest import run_x2x

PASSWORD = "S3cr3t-pa55-xyzzy"


@pytest.fixture
def properties(tmp_path):
    path = tmp_path / "client.properties"
    path.write_text("security.protocol=SASL_PLAINTEXT\nsasl.mechanism=PLAIN\n"
                    f"sasl.username=x2x\nsasl.password={PASSWORD}\n"
                    f"ssl.key.password={PASSWORD}\ndebug=conf,security,broker\n")
    return path


@pytest.mark.parametrize("where", ["unreachable", "broker"])
def test_no_password_in_output_or_logs(broker, properties, where):
    bootstrap = "127.0.0.1:1" if where == "unreachable" else broker.bootstrap
    proc = run_x2x("-v", "--bootstrap", bootstrap, "status", check=False,
                   env={"X2X_KAFKA_CONFIG": str(properties)}, timeout=120)
    assert proc.returncode != 0        # SASL against a plain listener, or nobody there
    assert "error:" in proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr


def test_settings_repr_is_redacted(properties):
    from infra.kafka import KafkaSettings
    s = KafkaSettings.resolve("127.0.0.1:1", str(properties))
    assert s.extra["sasl.password"] == PASSWORD          # passed through to librdkafka
    assert PASSWORD not in repr(s) and "sasl.password" in repr(s)
