"""`sidemesh inject`: YAML in, injected YAML out, for every workload kind; errors say what to do."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sidemesh.cli import main

ROOT = Path(__file__).resolve().parents[3]

WORKLOADS = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: web:1
        ports: [{name: http, containerPort: 8080}]
        readinessProbe: {httpGet: {path: /ready, port: http}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report, namespace: shop}
spec:
  schedule: "0 * * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: Never
          containers: [{name: report, image: report:1}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata:
      labels: {app: db}
      annotations: {sidemesh.io/inject: "false"}
    spec:
      containers: [{name: db, image: db:1}]
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: DaemonSet
  metadata: {name: agent, namespace: shop}
  spec:
    selector: {matchLabels: {app: agent}}
    template:
      metadata: {labels: {app: agent}}
      spec:
        containers: [{name: agent, image: agent:1}]
- apiVersion: batch/v1
  kind: Job
  metadata: {name: once, namespace: shop}
  spec:
    template:
      spec:
        restartPolicy: Never
        containers: [{name: once, image: once:1}]
- apiVersion: apps/v1
  kind: ReplicaSet
  metadata: {name: rs, namespace: shop}
  spec:
    selector: {matchLabels: {app: rs}}
    template:
      metadata: {labels: {app: rs}}
      spec:
        containers: [{name: rs, image: rs:1}]
"""


def run(
    argv: list[str], stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["inject", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def template_names(doc: dict) -> list[str]:  # type: ignore[type-arg]
    spec = doc["spec"]["jobTemplate"]["spec"] if doc["kind"] == "CronJob" else doc["spec"]
    pod = spec["template"]["spec"]
    return [c["name"] for c in [*pod.get("initContainers", []), *pod["containers"]]]


def test_every_kind_from_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["-"], WORKLOADS, monkeypatch, capsys)
    assert code == 0, err
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "CronJob", "StatefulSet", "List"]
    deploy, service, cron, sts, lst = docs
    assert template_names(deploy) == ["sidemesh-init", "sidemesh-proxy", "web"]
    assert template_names(cron) == ["sidemesh-init", "sidemesh-proxy", "report"]
    assert template_names(sts) == ["db"]  # opted out
    assert service == yaml.safe_load(WORKLOADS.split("---")[1])
    assert [template_names(item) for item in lst["items"]] == [
        ["sidemesh-init", "sidemesh-proxy", name] for name in ("agent", "once", "rs")
    ]
    probe = deploy["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/app-health/web/readyz"
    assert "&" not in out and "*id" not in out  # no YAML anchors for kubectl to trip on
    assert err.splitlines() == [
        "deployment/web injected",
        "service/web unchanged",
        "cronjob/report injected",
        'statefulset/db skipped (opted out: annotation sidemesh.io/inject: "false")',
        "daemonset/agent injected",
        "job/once injected",
        "replicaset/rs injected",
    ]
    for doc in [deploy, service, cron, sts, *lst["items"]]:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


class GoYamlV2Loader(yaml.SafeLoader):
    """Reads plain scalars as kubectl's go-yaml v2 does where it differs from PyYAML: y/n are
    booleans, Go's ParseFloat and ParseInt (base 0) read 1e3, 0o17, 1_000 as numbers."""

    bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}  # noqa: RUF012


GoYamlV2Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))
GoYamlV2Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
GoYamlV2Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0[oO][0-7_]+$"), list("-+0"))


def test_strings_stay_strings_for_kubectl(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Values PyYAML writes plain but go-yaml v2 (kubectl) reads as booleans or numbers: kubectl
    would refuse the object ("cannot unmarshal bool into ... of type string")."""
    values = [
        "n",
        "y",
        "Y",
        "N",
        "yes",
        "off",
        "1e3",
        "0o17",
        "1234e56",
        "1_000",
        ".5",
        "-1",
        "null",
        "~",
        "",
        "café ☕",  # written as it is (it was "caf\xE9 \u2615": the same to a parser, not to a reader)
        "a\x85b",  # NEL: a line break to YAML 1.1 readers, folded to a space unless escaped
        "a\u2028b\u2029",
    ]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {f"l{i}": v for i, v in enumerate(values)}},
        "spec": {
            "containers": [
                {
                    "name": "app",
                    "image": "app:1",
                    "env": [{"name": f"E{i}", "value": v} for i, v in enumerate(values)],
                }
            ]
        },
    }
    code, out, err = run(["-"], json.dumps(pod), monkeypatch, capsys)  # (JSON: every string quoted)
    assert code == 0, err
    assert "café ☕" in out
    for loader in (yaml.SafeLoader, GoYamlV2Loader):
        doc = yaml.load(out, Loader=loader)
        assert doc["metadata"]["labels"] == pod["metadata"]["labels"]
        app = next(c for c in doc["spec"]["containers"] if c["name"] == "app")
        assert app["env"] == pod["spec"]["containers"][0]["env"]
    # The emulation does read the plain forms as kubectl would (the test can fail).
    assert yaml.load("a: n\nb: 1e3\nc: 0o17\n", Loader=GoYamlV2Loader) == {"a": False, "b": 1000.0, "c": 15}


def test_what_kubectl_reads_as_strings_stays_strings(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """PyYAML read `22:30` as 1350 (YAML 1.1 base 60, which kubectl's go-yaml v2 does not have):
    an annotation, env values and args came out as numbers (kubectl then refused the pod), a
    custom resource's field was changed while the report said "unchanged", and a plain `=` made
    the whole run fail."""
    manifest = """\
apiVersion: v1
kind: Pod
metadata: {name: p, annotations: {maintenance-window: 22:30}}
spec:
  containers:
  - name: app
    image: app:1
    args: [--start, 09:30, --sep, =]
    env: [{name: MAC, value: 52:54:00:12:34:56}]
  volumes: [{name: cfg, configMap: {name: cfg, defaultMode: 0o440}}]
---
apiVersion: example.com/v1
kind: Backup
metadata: {name: nightly}
spec: {startAt: 1:30, date: 2030-01-01}
"""
    code, out, err = run(["-"], manifest, monkeypatch, capsys)
    assert code == 0, err
    pod, backup = yaml.safe_load_all(out)
    assert pod["metadata"]["annotations"]["maintenance-window"] == "22:30"
    assert pod["spec"]["volumes"][0]["configMap"]["defaultMode"] == 0o440  # (Go's 0o: a number)
    app = next(c for c in pod["spec"]["containers"] if c["name"] == "app")
    assert app["args"] == ["--start", "09:30", "--sep", "="]
    assert app["env"] == [{"name": "MAC", "value": "52:54:00:12:34:56"}]
    assert backup["spec"] == {"startAt": "1:30", "date": "2030-01-01"}
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)


def test_files_settings_and_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a.yaml").write_text(WORKLOADS.split("---")[0])
    settings = ROOT / "manifests" / "mesh-config.yaml"
    code, out, _ = run(
        [
            "--settings",
            str(settings),
            "--image",
            "reg/sm:9",
            "--native-sidecar",
            "false",
            str(tmp_path / "a.yaml"),
        ],
        "",
        monkeypatch,
        capsys,
    )
    assert code == 0
    pod = yaml.safe_load(out)["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["sidemesh-proxy", "web"]
    assert pod["containers"][0]["image"] == "reg/sm:9"


def test_injected_output_is_injected_again_unchanged(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, once, _ = run(["-"], WORKLOADS, monkeypatch, capsys)
    _, twice, err = run(["-"], once, monkeypatch, capsys)
    assert list(yaml.safe_load_all(twice)) == list(yaml.safe_load_all(once))
    assert "already injected" in err


@pytest.mark.parametrize(
    ("argv", "stdin", "message"),
    [
        (["/nonexistent.yaml"], "", "/nonexistent.yaml: No such file or directory"),
        (["-"], "a: [", "standard input is not valid YAML: while parsing a flow node did not find"),
        (
            ["-"],
            "kind: Deployment\nmetadata: {name: x}\nspec: {}\n",
            "deployment/x: no pod template at spec.template",
        ),
        (
            ["-"],
            "kind: Pod\nmetadata: {name: p, annotations: {sidemesh.io/exclude-inbound-ports: x}}\nspec: {containers: [{name: a}]}\n",
            "pod/p: annotation sidemesh.io/exclude-inbound-ports: 'x' is not a port number",
        ),
        (["--settings", "/nonexistent", "-"], "", "settings /nonexistent: cannot read"),
    ],
)
def test_errors_say_what_to_do(
    argv: list[str],
    stdin: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(argv, stdin, monkeypatch, capsys)
    assert code == 2 and out == ""
    assert message in err


def test_with_several_files_an_error_names_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The YAML error named no file (and took three lines): with several, which one was it?"""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(WORKLOADS)
    bad.write_text("kind: Pod\nmetadata: {name: [\n")
    code, out, err = run([str(good), str(bad)], "", monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"sidemesh: error: {bad} is not valid YAML: ")
    code, out, err = run([str(good), str(good)], "", monkeypatch, capsys)
    assert code == 0 and list(yaml.safe_load_all(out)) == 2 * list(
        yaml.safe_load_all(run([str(good)], "", monkeypatch, capsys)[1])
    )


def test_a_file_that_is_not_utf8_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """UTF-16 with a byte-order mark (PowerShell's `kubectl get -o yaml > f.yaml`): a traceback."""
    path = tmp_path / "pod.yaml"
    path.write_bytes("kind: Pod\n".encode("utf-16"))
    code, out, err = run([str(path)], "", monkeypatch, capsys)
    assert code == 2 and out == "" and "not UTF-8 text" in err and "save it as UTF-8" in err


def test_help_lists_the_options() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidemesh", "inject", "--help"], capture_output=True, text=True, check=True
    )
    for word in ("--settings", "--image", "--native-sidecar", "CronJobs", "examples:"):
        assert word in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "sidemesh", "injector", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for word in ("--tls-cert", "--settings-file", "--webhook-configuration", "SIDEMESH_INJECTOR_LISTEN"):
        assert word in proc.stdout


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (
            "root:x:0:0:root:/root:/bin/bash\n",
            "not a Kubernetes object (a mapping with apiVersion and kind) but a string",
        ),
        ("kind: List\nitems: 5\n", "List: items is a number, not a list"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: 7\n",
            "Deployment: metadata is a number, not a mapping",
        ),
        ("apiVersion: v1\nmetadata: {name: x}\n", "an object without a kind (keys: apiVersion, metadata)"),
    ],
)
def test_what_is_not_a_kubernetes_object_is_refused(
    stdin: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is no manifest at all (a typo'd path) came out as if injected, exit 0: kubectl
    refuses such a document ("Object 'Kind' is missing"), so does inject."""
    code, out, err = run(["-"], stdin, monkeypatch, capsys)
    assert code == 2 and out == ""
    assert message in err and "is it a Kubernetes manifest" in err, err


def test_a_settings_error_names_the_file_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """It named config.yaml (the ConfigMap's key) whatever --settings said, on three lines."""
    bad = tmp_path / "mine.yaml"
    bad.write_text("image: [\n")
    code, out, err = run(["--settings", str(bad), "-"], WORKLOADS, monkeypatch, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert f"settings {bad}: not YAML: " in err
    bad.write_text("- a list\n")
    code, out, err = run(["--settings", str(bad), "-"], WORKLOADS, monkeypatch, capsys)
    assert code == 2 and f"settings {bad}: must be a map of settings" in err


@pytest.mark.parametrize("stdin", ["kind: List\nitems:\n", "apiVersion: v1\nkind: ConfigMap\nmetadata:\n"])
def test_empty_fields_kubectl_accepts_pass(
    stdin: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["-"], stdin, monkeypatch, capsys)
    assert code == 0, err


def test_an_empty_image_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--image "$IMAGE"` with IMAGE unset injected the default image without a word."""
    code, out, err = run(["--image", "", "-"], WORKLOADS, monkeypatch, capsys)
    assert code == 2 and out == "" and "--image is empty" in err
