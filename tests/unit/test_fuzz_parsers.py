"""Untrusted bytes and documents never crash a parser: a clear error, or a valid value."""

from __future__ import annotations

import contextlib
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca.csr import validate_csr
from ca.errors import CAError
from proxy import framing
from proxy.detect import Kind, classify
from sidemesh.mesh.resources import build_snapshot
from sidemesh.policy import crd
from sidemesh.spiffe import SpiffeId, SpiffeIdError

ME = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
FAST = settings(
    max_examples=int(__import__("os").environ.get("SIDEMESH_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_frame_decoder_yields_frames_or_a_framing_error(chunks: list[bytes]) -> None:
    decoder = framing.Decoder()
    try:
        for chunk in chunks:
            for kind, payload in decoder.feed(chunk):
                assert kind in (framing.OPEN, framing.DATA, framing.EOF, framing.DENY)
                assert len(payload) <= framing.MAX_DATA
    except framing.FramingError:
        pass


@FAST
@given(st.lists(st.binary(min_size=0, max_size=2000), min_size=1, max_size=5), st.data())
def test_frames_survive_any_split(payloads: list[bytes], data: st.DataObject) -> None:
    wire = (
        framing.open_frame(8080)
        + b"".join(framing.data_header(len(p)) + p for p in payloads)
        + framing.EOF_FRAME
    )
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=10)))
    pieces = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    decoder = framing.Decoder()
    frames = [f for piece in pieces for f in decoder.feed(piece)]
    assert frames[0] == (framing.OPEN, (8080).to_bytes(2, "big"))
    assert b"".join(bytes(p) for k, p in frames if k == framing.DATA) == b"".join(payloads)
    assert frames[-1] == (framing.EOF, b"")


@FAST
@given(st.lists(st.binary(min_size=0, max_size=2000), min_size=1, max_size=5))
def test_whole_frames_one_per_chunk(payloads: list[bytes]) -> None:
    # What a relay sees most: each read is one whole DATA frame (the decoder's fast path).
    decoder = framing.Decoder()
    for p in payloads:  # (an empty DATA frame carries nothing: nothing comes out of it)
        assert [(k, bytes(v)) for k, v in decoder.feed(framing.data_header(len(p)) + p)] == (
            [(framing.DATA, p)] if p else []
        )
    assert decoder.feed(framing.EOF_FRAME) == [(framing.EOF, b"")]
    assert decoder.pending == 0


@FAST
@given(st.binary(max_size=600))
def test_classify_never_crashes(peeked: bytes) -> None:
    assert classify(peeked) in (None, *Kind)


@FAST
@given(
    st.one_of(
        st.text(max_size=400),
        st.binary(max_size=400).map(
            lambda b: (
                "-----BEGIN CERTIFICATE REQUEST-----\n" + b.hex() + "\n-----END CERTIFICATE REQUEST-----\n"
            )
        ),
    )
)
def test_csr_validation_refuses_garbage_with_a_ca_error(text: str) -> None:
    try:
        validate_csr(text, ME)
    except CAError as exc:
        assert exc.public


@FAST
@given(st.text(alphabet=string.printable, max_size=200))
def test_spiffe_ids_parse_or_fail_clearly(text: str) -> None:
    with contextlib.suppress(SpiffeIdError):
        assert str(SpiffeId.parse(text)) == text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "selector",
                    "matchLabels",
                    "rules",
                    "from",
                    "to",
                    "ports",
                    "http",
                    "methods",
                    "paths",
                    "mode",
                    "serviceAccount",
                    "namespace",
                    "unauthenticated",
                    "app",
                    "x",
                ]
            ),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@FAST
@given(json_values)
def test_policy_documents_parse_or_fail_clearly(spec: Any) -> None:
    doc = {
        "apiVersion": crd.API_VERSION,
        "kind": crd.KIND,
        "metadata": {"name": "p", "namespace": "shop"},
        "spec": spec,
    }
    try:
        crd.parse(doc)
    except crd.PolicyError as exc:
        assert str(exc)


@FAST
@given(
    st.lists(json_values, max_size=4),
    st.sampled_from(["Service", "Workload", "Namespace", "ServiceAuthorization", "Pod"]),
)
def test_a_snapshot_is_built_from_anything(docs: list[Any], kind: str) -> None:
    api = "v1" if kind in ("Service", "Namespace", "Pod") else crd.API_VERSION
    wrapped = [
        (
            f"doc{i}",
            {
                "apiVersion": api,
                "kind": kind,
                "metadata": d if isinstance(d, dict) else {"name": "x"},
                "spec": d,
            },
        )
        for i, d in enumerate(docs)
    ]
    snapshot = build_snapshot(wrapped)  # errors are collected, never raised
    assert len(snapshot.errors) <= 2 * len(docs)  # (its own, and one more for a name used twice)


# -- the config stream: what a sidecar does with an Update it cannot trust to be well formed ------


def _stream_client() -> tuple[Any, list[str]]:
    """A ConfigClient whose apply is the sidecar's own (sidecar_view), without the network."""
    from proxy.config_client import ConfigClient
    from sidemesh.mesh.compile import CompileError, sidecar_view

    applied: list[str] = []
    state: dict[str, Any] = {}

    def apply(inbound: Any, outbound: Any, version: str) -> None:
        inbound, outbound = inbound or state.get("in"), outbound or state.get("out")
        if inbound is None or outbound is None:
            raise CompileError("the first update must carry both parts")
        sidecar_view(inbound, outbound, "shop/cart-1", version)
        state.update({"in": inbound, "out": outbound})
        applied.append(version)

    class _Identity:
        def on_rotate(self, callback: Any) -> None:
            pass

    return ConfigClient("127.0.0.1:1", "controller", _Identity(), apply), applied  # type: ignore[arg-type]


def _valid_update() -> bytes:
    import yaml

    from sidemesh import demo
    from sidemesh.api import config_pb2 as pb
    from sidemesh.mesh import wire
    from sidemesh.mesh.compile import compile_inbound, compile_outbound
    from sidemesh.policy.model import DefaultPolicy
    from sidemesh.spiffe import WorkloadId

    docs = [("demo.yaml", d) for d in yaml.safe_load_all(demo.MANIFESTS.format(net="127.9.9"))]
    docs += [("allow.yaml", yaml.safe_load(demo.ALLOW.format(who="frontend")))]
    snapshot = build_snapshot(docs)
    inbound = compile_inbound(snapshot, WorkloadId("shop", "cart"), "cluster.local", DefaultPolicy("deny"))
    outbound = compile_outbound(snapshot, "cluster.local")
    update = pb.Update(
        version="v1", inbound=wire.inbound_to_pb(inbound), outbound=wire.outbound_to_pb(outbound)
    )
    return update.SerializeToString()


VALID_UPDATE = _valid_update()


def test_the_valid_update_applies() -> None:
    # The control for the fuzz below: the unmutated message is applied and acknowledged.
    from sidemesh.api import config_pb2 as pb

    client, applied = _stream_client()
    ack = client._handle(pb.Update.FromString(VALID_UPDATE))
    assert applied == ["v1"] and ack.ack_version == "v1" and not ack.error


def test_an_update_without_a_version_is_refused_and_the_last_one_kept() -> None:
    """The controller versions every update. grpclib checks a message's length only with an
    assert: under -OO (a sidecar's PYTHONOPTIMIZE=2) a message cut short after its length prefix
    arrives as an empty Update, which was applied as version "" (the last parts again), acked, and
    counted as the current configuration."""
    from sidemesh.api import config_pb2 as pb

    client, applied = _stream_client()
    client._handle(pb.Update.FromString(VALID_UPDATE))
    ack = client._handle(pb.Update())
    assert applied == ["v1"] and client.version == "v1"
    assert ack.ack_version == "" and "without a version" in ack.error


@FAST
@given(st.data())
def test_a_corrupted_config_update_is_refused_with_a_nack_never_a_crash(data: st.DataObject) -> None:
    from google.protobuf.message import DecodeError

    from sidemesh.api import config_pb2 as pb

    raw = bytearray(VALID_UPDATE)
    for _ in range(data.draw(st.integers(1, 8))):  # flip, overwrite or drop bytes anywhere
        pos = data.draw(st.integers(0, len(raw) - 1))
        op = data.draw(st.sampled_from(["set", "del", "ins"]))
        if op == "set":
            raw[pos] = data.draw(st.integers(0, 255))
        elif op == "del" and len(raw) > 1:
            del raw[pos]
        else:
            raw.insert(pos, data.draw(st.integers(0, 255)))
    try:
        update = pb.Update.FromString(bytes(raw))
    except DecodeError:
        return  # grpc would end the stream with an error: the sidecar keeps its last config
    client, applied = _stream_client()
    ack = client._handle(update)  # must not raise
    assert ack.ack_version == update.version
    assert bool(ack.error) != bool(applied), "neither applied nor refused with a reason"


@FAST
@given(st.binary(max_size=2000))
def test_random_bytes_as_a_config_update(raw: bytes) -> None:
    from google.protobuf.message import DecodeError

    from sidemesh.api import config_pb2 as pb

    try:
        update = pb.Update.FromString(raw)
    except DecodeError:
        return
    client, applied = _stream_client()
    ack = client._handle(update)
    assert bool(ack.error) != bool(applied)


@pytest.mark.parametrize("labels", [True, 1, "app", [1], None])  # null too: the CRD says object
def test_match_labels_that_are_not_a_mapping_are_a_policy_error(labels: Any) -> None:
    # Found by the fuzz test above: a non-iterable matchLabels was a TypeError, not a PolicyError.
    doc = {
        "apiVersion": "sidemesh.io/v1alpha1",
        "kind": "ServiceAuthorization",
        "metadata": {"name": "a", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": labels}},
    }
    with pytest.raises(crd.PolicyError, match=r"matchLabels: (must be an object|is null)"):
        crd.parse(doc)
