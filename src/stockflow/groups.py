"""Consumer groups as Kafka sees them: members, what each is assigned, and per partition the
committed offset, the end offset and the lag.

A stockflow pipeline has two groups: the routers' ``<group>-router`` (reading the input topic)
and the appliers' ``<group>`` (reading the commands topic), see ``config.Settings``.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException
from confluent_kafka.admin import AdminClient

from stockflow.config import Settings
from stockflow.errors import GroupError, KafkaUnavailableError
from stockflow.topics import admin_client, latest_offsets


@dataclass(frozen=True)
class Member:
    """One member of a group and the partitions it owns."""

    member_id: str
    client_id: str
    host: str
    assignment: list[tuple[str, int]]


@dataclass(frozen=True)
class PartitionLag:
    """One partition the group reads: its committed offset (None: never committed), the end
    offset and the lag; ``owner`` is the client id of the member assigned to it."""

    topic: str
    partition: int
    committed: int | None
    end_offset: int
    lag: int
    owner: str | None


@dataclass(frozen=True)
class GroupInfo:
    """What ``stockflow groups`` shows of one group."""

    group_id: str
    stage: str | None
    """``router`` or ``applier`` for a pipeline's groups."""
    state: str
    coordinator: int | None
    members: list[Member]
    partitions: list[PartitionLag]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def describe_group(settings: Settings, group: str, *, stage: str | None = None) -> GroupInfo:
    """``group``'s members, assignments and lag; GroupError if Kafka knows no such group
    (no member and no committed offset)."""
    admin = admin_client(settings)  # kept alive until the futures are done
    timeout = settings.kafka_timeout_seconds
    try:
        description = admin.describe_consumer_groups([group], request_timeout=timeout)[
            group
        ].result()
        offsets = (
            admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group)], request_timeout=timeout
            )[group]
            .result()
            .topic_partitions
            or []
        )
    except KafkaException as exc:
        raise KafkaUnavailableError(
            f"cannot describe group {group!r} at {settings.addresses()['kafka']}: {exc}"
        ) from None
    members = [
        Member(
            m.member_id,
            m.client_id,
            m.host,
            sorted(
                (tp.topic, tp.partition)
                for tp in (m.assignment.topic_partitions if m.assignment else [])
            ),
        )
        for m in description.members
    ]
    if not members and not offsets:
        raise GroupError(f"group {group!r} does not exist (no member, no committed offset)")
    committed = {(tp.topic, tp.partition): tp.offset for tp in offsets}
    owners = {tp: m.client_id for m in members for tp in m.assignment}
    topics = {topic for topic, _ in committed} | {topic for topic, _ in owners}
    partitions = _partitions_of(settings, admin, topics)
    ends = latest_offsets(settings, partitions, admin=admin)
    rows = []
    for tp in sorted(partitions):
        done = committed.get(tp)
        done = done if done is not None and done >= 0 else None
        rows.append(
            PartitionLag(*tp, done, ends[tp], max(0, ends[tp] - (done or 0)), owners.get(tp))
        )
    state = description.state.name.lower() if description.state is not None else "unknown"
    coordinator = description.coordinator.id if description.coordinator is not None else None
    return GroupInfo(group, stage, state, coordinator, sorted(members, key=_by_client), rows)


def pipeline_groups(settings: Settings, group: str | None = None) -> list[GroupInfo]:
    """Both stages' groups of the pipeline whose applier group is ``group`` (default: the
    configured one): the router group first. GroupError if neither exists; a stage not run yet
    is left out."""
    base = settings.model_copy(update={"group_id": group}) if group else settings
    found = []
    for stage, name in (("router", base.router_group_id), ("applier", base.group_id)):
        try:
            found.append(describe_group(settings, name, stage=stage))
        except GroupError:
            continue
    if not found:
        raise GroupError(
            f"groups {base.router_group_id!r} and {base.group_id!r} do not exist (no member, "
            "no committed offset): has a worker run with this group?"
        )
    return found


def _by_client(member: Member) -> tuple[str, str]:
    return (member.client_id, member.member_id)


def _partitions_of(
    settings: Settings, admin: AdminClient, topics: set[str]
) -> list[tuple[str, int]]:
    partitions: list[tuple[str, int]] = []
    for topic in sorted(topics):
        try:
            metadata = admin.list_topics(topic, timeout=settings.kafka_timeout_seconds)
        except KafkaException as exc:
            raise KafkaUnavailableError(
                f"cannot reach Kafka at {settings.addresses()['kafka']}: {exc}"
            ) from None
        found = metadata.topics.get(topic)
        if found is None or found.error is not None:
            continue  # committed offsets of a deleted topic: nothing to measure against
        partitions.extend((topic, p) for p in found.partitions)
    return partitions
