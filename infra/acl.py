"""Kafka principals for x2x's roles, and exactly the ACLs each role needs.

:func:`grants` is the one statement of what a role may do; ``docs/security.md`` prints
the same table. :func:`grant` creates a SCRAM-SHA-512 user, binds its role's ACLs and
returns the librdkafka properties a service of that role runs with
(``X2X_KAFKA_CONFIG``).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (AclBinding, AclBindingFilter, AclOperation,
                                   AclPermissionType, AdminClient, ResourcePatternType,
                                   ResourceType, ScramCredentialInfo, ScramMechanism,
                                   UserScramCredentialDeletion,
                                   UserScramCredentialUpsertion)

from infra.kafka import CONSUMER_GROUP
from infra.topics import JOURNAL_PREFIX, STATUS_TOPIC, control_topic, journal_topic
from journal.errors import BadInput, BrokerError
from journal.pairs import validate_name
from journal.roles import Role

MECHANISM = "SCRAM-SHA-512"
_SCRAM_ITERATIONS = 8192


@dataclass(frozen=True)
class Grant:
    """One allowed operation on one resource (a topic, a topic prefix, the cluster)."""

    resource: ResourceType
    name: str
    pattern: ResourcePatternType
    operation: AclOperation

    def describe(self) -> str:
        kind = "prefix" if self.pattern == ResourcePatternType.PREFIXED else "literal"
        return f"{self.operation.name} on {self.resource.name} {self.name!r} ({kind})"


def _topic(name: str, *ops: AclOperation, prefix: bool = False) -> list[Grant]:
    pattern = ResourcePatternType.PREFIXED if prefix else ResourcePatternType.LITERAL
    return [Grant(ResourceType.TOPIC, name, pattern, op) for op in ops]


def grants(role: Role, pair: str | None = None) -> list[Grant]:
    """Everything ``role`` may do: on ``pair``'s journal only, or on every journal."""
    R, W, D = AclOperation.READ, AclOperation.WRITE, AclOperation.DESCRIBE
    journal = journal_topic(validate_name(pair)) if pair else JOURNAL_PREFIX
    on_journal = dict(prefix=pair is None)
    # Every role reads the whole control plane (pair specs, requests, answers), with a
    # consumer whose group librdkafka looks up even though nothing is committed.
    control = [*(g for r in Role for g in _topic(control_topic(r), R, D)),
               Grant(ResourceType.GROUP, CONSUMER_GROUP, ResourcePatternType.LITERAL, R)]
    own_control = _topic(control_topic(role), W)
    if role is Role.CAPTURER:
        # Write the journal; read it back to check the broker still holds the last
        # acknowledged record (a lost journal is detected, never assumed).
        return [*_topic(journal, W, R, D, **on_journal), *control, *own_control,
                *_topic(STATUS_TOPIC, W, R, D)]
    if role is Role.APPLIER:
        return [*_topic(journal, R, D, **on_journal), *control, *own_control,
                *_topic(STATUS_TOPIC, W, R, D)]
    # The operator creates and deletes pairs (their journal topics), sizes a windowed
    # journal's segments (ALTER_CONFIGS), reads journals for replicas and checks, and
    # publishes lifecycle events; it never writes a journal. It writes x2x.status: the
    # replicas it builds register there what they need of the journal. The history base
    # (x2x base) runs as an operator: DeleteRecords needs DELETE on the journal, which
    # Kafka does not separate from deleting the topic, so appliers do not get it.
    return [*_topic(journal, AclOperation.CREATE, AclOperation.DELETE, R, D,
                    AclOperation.DESCRIBE_CONFIGS, AclOperation.ALTER_CONFIGS, **on_journal),
            *control, *own_control,
            *(g for r in Role for g in _topic(control_topic(r), AclOperation.CREATE)),
            *_topic(STATUS_TOPIC, AclOperation.CREATE, W, R, D)]


def _binding(principal: str, g: Grant) -> AclBinding:
    return AclBinding(g.resource, g.name, g.pattern, principal, "*", g.operation,
                      AclPermissionType.ALLOW)


def _result(futures: dict, what: str) -> None:
    for f in futures.values() if isinstance(futures, dict) else futures:
        try:
            f.result()
        except KafkaException as e:
            raise BrokerError(f"{what} failed: {e.args[0].str() if e.args else e}; the "
                              f"client must run with the cluster's admin credentials "
                              f"(X2X_KAFKA_CONFIG)") from None


def grant(admin: AdminClient, user: str, role: Role, pair: str | None,
          bootstrap: str) -> dict[str, str]:
    """Create (or reset) SCRAM user ``user`` with a new password and bind ``role``'s ACLs;
    returns the librdkafka properties a service of that role needs."""
    if not user or any(c in user for c in ",=[] ") or len(user) > 200:
        raise BadInput(f"user name {user!r} is invalid: use letters, digits, '.', '_' "
                       f"or '-', without spaces, commas, '=' or brackets")
    password = secrets.token_urlsafe(24)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, _SCRAM_ITERATIONS)
    _result(admin.alter_user_scram_credentials(
        [UserScramCredentialUpsertion(user, info, password.encode())]),
        f"creating Kafka user {user}")
    principal = f"User:{user}"
    _result(admin.create_acls([_binding(principal, g) for g in grants(role, pair)]),
            f"binding the {role.value} ACLs of {user}")
    return {"bootstrap.servers": bootstrap, "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": MECHANISM, "sasl.username": user, "sasl.password": password}


def revoke(admin: AdminClient, user: str) -> int:
    """Remove every ACL of ``user`` and the user itself; returns the ACLs removed."""
    flt = AclBindingFilter(ResourceType.ANY, None, ResourcePatternType.ANY, f"User:{user}",
                           None, AclOperation.ANY, AclPermissionType.ANY)
    removed = 0
    for f in admin.delete_acls([flt]).values():
        try:
            removed += len(f.result())
        except KafkaException as e:
            raise BrokerError(f"removing the ACLs of {user} failed: {e}") from None
    try:
        for f in admin.alter_user_scram_credentials(
                [UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)]).values():
            f.result()
    except KafkaException:
        pass  # no such user: revoking twice is fine
    return removed


def properties_text(props: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in props.items())


def table() -> list[str]:
    """The grants of every role as Markdown table rows (docs/security.md prints them)."""
    resources: dict[str, dict[Role, list[str]]] = {}
    for role in Role:
        for g in grants(role):
            name = (f"topic `{g.name}<pair>`" if g.pattern == ResourcePatternType.PREFIXED
                    else f"{g.resource.name.lower()} `{g.name}`")
            resources.setdefault(name, {}).setdefault(role, []).append(g.operation.name)
    header = ["| resource | " + " | ".join(r.value for r in Role) + " |",
              "| --- |" + " --- |" * len(Role)]
    return header + [f"| {name} | " + " | ".join(", ".join(ops.get(r, [])) or "-"
                                                 for r in Role) + " |"
                     for name, ops in resources.items()]
