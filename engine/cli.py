"""``orthanc-ai``: run Orthanc with the plugin, or run the demo.

    orthanc-ai serve --data DIR --http-port P --dicom-port Q [--config FILE]
    orthanc-ai demo  --data DIR --http-port P --dicom-port Q [--exit]
    orthanc-ai check-config [--config FILE]
    orthanc-ai validate-model FOLDER
    orthanc-ai audit verify (--data DIR | --config FILE | --log FILE)
    orthanc-ai model-server --models DIR [--host H] [--port P]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from engine.config import (
    PROJECT_ROOT,
    AIConfig,
    ConfigError,
    check_peers,
    load_orthanc_json,
    parse_ai_section,
)
from inference.routing import RoutingError

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIR = Path("/usr/share/orthanc/plugins")
PLUGINS = ("libOrthancPython.so", "libOrthancDicomWeb.so")
# Orthanc's own index and storage in PostgreSQL (Debian orthanc-postgresql),
# loaded when the configuration has a PostgreSQL section: how nodes share one archive.
POSTGRESQL_PLUGINS = ("libOrthancPostgreSQLIndex.so", "libOrthancPostgreSQLStorage.so")
STORESCU = "/usr/bin/storescu"  # dcmtk's, not pynetdicom's script of the same name


def orthanc_config(base: dict[str, Any], data: Path, http_port: int, dicom_port: int) -> dict:
    """The configuration `serve` runs: the user's, with our paths and ports."""
    config = dict(base)
    plugins = PLUGINS + (POSTGRESQL_PLUGINS if "PostgreSQL" in base else ())
    storage = data / "orthanc-db"
    config.update(
        {
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": http_port,
            "DicomPort": dicom_port,
            "RemoteAccessAllowed": False,
            "Plugins": [str(PLUGIN_DIR / p) for p in plugins if (PLUGIN_DIR / p).exists()],
            "PythonScript": str(PROJECT_ROOT / "plugin" / "entry.py"),
        }
    )
    config.setdefault("DicomWeb", {"Enable": True, "Root": "/dicom-web/"})
    return config


# What an Orthanc newer than Debian 12's 1.10.1 / orthanc-python 4.0 lets `serve`
# switch on: (package, first version, setting, value). The user's configuration wins.
CAPABILITIES = (
    ("orthanc", (1, 12, 10), "HttpBindAddresses", ["127.0.0.1"]),  # HTTP on loopback only
    ("orthanc-python", (4, 3), "Python.AllowThreads", True),  # the GIL released in SDK calls
)


def _version(text: str | None) -> tuple[int, ...]:
    """``1:1.13.0+dfsg-1+b1`` -> (1, 13, 0); () when unknown."""
    if not text:
        return ()
    numbers = text.split(":", 1)[-1].split("+")[0].split("-")[0].split("~")[0]
    try:
        return tuple(int(n) for n in numbers.split("."))
    except ValueError:
        return ()


def orthanc_versions(root: Path | None = None, binary: str = ORTHANC) -> dict[str, str]:
    """What `serve` will run: in a root (the forky one), its dpkg packages; here,
    Orthanc's version from the binary it starts (which dpkg may not have
    installed), the plugins' from dpkg (serve loads them from PLUGIN_DIR)."""
    from engine.current_orthanc import package_versions

    try:
        versions = package_versions(root or Path("/"))
    except OSError:
        versions = {}
    if root is None:
        versions.pop("orthanc", None)
        try:
            out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout.split()
        except (OSError, subprocess.SubprocessError):
            out = []
        if len(out) > 1 and _version(out[1]):
            versions["orthanc"] = out[1]
    return versions


def use_capabilities(config: dict[str, Any], versions: dict[str, str]) -> list[str]:
    """Switch on in ``config`` what these versions offer (unless it is set); what was."""
    used = []
    for package, first, setting, value in CAPABILITIES:
        section, _, key = setting.rpartition(".")
        target = dict(config.get(section) or {}) if section else config
        if _version(versions.get(package)) < first or key in target:
            continue
        target[key] = value
        if section:
            config[section] = target  # a copy: the user's own dict stays as it was
        used.append(f"{setting} {json.dumps(value)}")
    return used


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def prepare(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """Validate, write DIR/orthanc.json, return Orthanc's command line and environment."""
    base = load_orthanc_json(Path(args.config))
    from inference.registry import Registry

    ai = parse_ai_section(base.get("AI"))  # fail before Orthanc starts, naming the key
    check_peers(ai, base)
    ai.router(Registry.scan(ai.models_directory).cards)
    for name, port in (("--http-port", args.http_port), ("--dicom-port", args.dicom_port)):
        if not _port_free(port):
            raise ConfigError(
                f"{name} {port} is already in use (another Orthanc? "
                "the Debian service can be stopped with `service orthanc stop`)"
            )
    data = Path(args.data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    config = orthanc_config(base, data, args.http_port, args.dicom_port)
    current = getattr(args, "orthanc", "debian") == "current"
    from engine import current_orthanc

    versions = orthanc_versions(current_orthanc.ROOT if current else None)
    used = use_capabilities(config, versions)
    print(f"orthanc-ai: Orthanc {versions.get('orthanc', 'of unknown version')}, Python plugin "
          f"{versions.get('orthanc-python', 'of unknown version')}"
          + (f": {', '.join(used)}" if used else ""), file=sys.stderr, flush=True)
    path = data / "orthanc.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    env = dict(os.environ)
    env["ORTHANC_AI_SITE_PACKAGES"] = sysconfig.get_paths()["purelib"]
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # glibc gives each thread its own malloc arena; with Orthanc's many threads
    # and ours, freed memory stays mapped and the resident size creeps up.
    env.setdefault("MALLOC_ARENA_MAX", "2")
    if current:
        return _in_current_root(config, ai, path, data, env)
    return [ORTHANC, str(path)], env


def _in_current_root(config: dict, ai_config: AIConfig, path: Path, data: Path,
                     env: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """Orthanc 1.13 in the forky root; the models on our server outside it.

    The root's Python (3.14) has no TensorFlow build, so unless the
    configuration names a model server, ours is started here from this venv,
    told to exit with this process (which becomes Orthanc), and the plugin is
    pointed at it."""
    from engine import current_orthanc as current
    from plugin.model_server import start_model_server

    argv = current.command(["/usr/sbin/Orthanc", str(path)],
                           [PROJECT_ROOT, data, ai_config.models_directory])
    ai = dict(config.get("AI") or {})
    if not ai.get("ModelServerUrl"):
        url, _ = start_model_server(ai_config.models_directory, data / "model-server.log",
                                    ai_config.tensorflow_threads)
        ai.update({"Backend": "http", "ModelServerUrl": url})
        config["AI"] = ai
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    env["ORTHANC_AI_SITE_PACKAGES"] = current.site_packages()
    return argv, env


def cmd_serve(args: argparse.Namespace) -> int:
    argv, env = prepare(args)
    # exec: Orthanc becomes this process, so SIGTERM reaches it directly and
    # it stops cleanly (closing its database and our job store).
    os.execvpe(argv[0], argv, env)
    return 0  # not reached


def cmd_check_config(args: argparse.Namespace) -> int:
    """The AI section, the model cards it finds and its routing rules."""
    from inference.registry import Registry

    configuration = load_orthanc_json(Path(args.config))
    ai = parse_ai_section(configuration.get("AI"))
    check_peers(ai, configuration)
    registry = Registry.scan(ai.models_directory)
    for folder, error in registry.errors.items():
        print(f"model folder {folder}: {error}", file=sys.stderr)
    router = ai.router(registry.cards)
    print(f"{args.config}: AI section is valid; models {sorted(registry.cards)}; "
          f"{len(router.rules)} routing rule(s)")
    return 1 if registry.errors else 0


def cmd_validate_model(args: argparse.Namespace) -> int:
    from inference.backend import InProcessBackend
    from inference.card import ModelCard

    card = ModelCard.from_folder(Path(args.folder))
    InProcessBackend().load(card)
    print(f"{card.id} {card.version}: card and weights are valid")
    return 0


def _get(url: str, timeout: float = 5.0) -> Any:
    import requests

    r = requests.get(url, timeout=timeout)
    r.raise_for_status()
    return r.json()


def wait_for_orthanc(base_url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {proc.returncode}")
        try:
            if _get(f"{base_url}/ai/models")["ready"]:  # models loaded, workers running
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"Orthanc did not answer on {base_url} within {timeout:.0f} s")


def _settled(job: dict) -> bool:
    return job["state"] in ("done", "skipped", "dead") or (
        job["state"] == "failed" and not job.get("next_attempt"))


def wait_for_jobs(base_url: str, instance_ids: list[str], series_ids: list[str],
                  timeout: float) -> list[dict]:
    """Jobs of these instances and (series-level) of these series, once all settled."""
    deadline = time.time() + timeout
    while True:
        # One query per resource: a data folder reused by many runs holds many jobs.
        mine = [j for i in instance_ids for j in _get(f"{base_url}/ai/jobs?instance={i}")]
        mine += [j for s in series_ids for j in _get(f"{base_url}/ai/jobs?series={s}")
                 if j["level"] == "series"]
        covered = {j["instance"] for j in mine} | {j["series"] for j in mine}
        if set(instance_ids) | set(series_ids) <= covered and all(map(_settled, mine)):
            return mine
        if time.time() > deadline:
            raise RuntimeError("timed out waiting for AI results")
        time.sleep(0.5)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import AET, DemoPacs, demo_configuration
    from engine.standins.audit_repository import SyslogReceiver
    from engine.standins.ris import MllpListener
    from training.synthetic.dx import write_demo_priors

    data = Path(args.data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    base = load_orthanc_json(Path(args.config))
    # SIGTERM (kill, a service manager) stops the demo's Orthancs as Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    pacs = DemoPacs(data / "demo-pacs", ORTHANC, str(base.get("DicomAet", "ORTHANC")),
                    args.dicom_port)
    print(f"Starting the demo PACS ({AET}, DICOM port {pacs.dicom_port}) with earlier "
          "studies of two demo patients, a demo RIS (HL7 MLLP) and a demo audit "
          "repository (syslog) ...")
    pacs.start()
    ris, audit = MllpListener().start(), SyslogReceiver("tcp").start()
    proc: subprocess.Popen | None = None
    try:
        for prior in write_demo_priors(data / "demo-priors", seed=args.seed):
            pacs.upload(prior)
        config = data / "demo-configuration.json"
        config.write_text(json.dumps(demo_configuration(base, pacs, ris.port, audit.port),
                                     indent=2))
        args.config = str(config)
        argv, env = prepare(args)
        log_path = data / "orthanc.log"
        base_url = f"http://127.0.0.1:{args.http_port}"
        print(f"Starting Orthanc with orthanc-ai on {base_url} (DICOM port {args.dicom_port});"
              f" log: {log_path}")
        with open(log_path, "ab") as log_file:
            proc = subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        return _demo(args, data, base_url, proc, ris, audit)
    except KeyboardInterrupt:
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
        pacs.stop()
        ris.stop()
        audit.stop()


def _demo(args: argparse.Namespace, data: Path, base_url: str, proc: subprocess.Popen,
          ris: Any, audit: Any) -> int:
    """Send the demo studies, print what the AI found, compared and forwarded."""
    from training.synthetic.ct import write_demo_ct_study
    from training.synthetic.dx import write_demo_studies

    wait_for_orthanc(base_url, proc)
    dx = write_demo_studies(data / "demo-dicom", n_patients=args.patients, seed=args.seed)
    ct = write_demo_ct_study(data / "demo-ct", seed=args.seed) if args.ct else []
    print(f"Sending {len(dx)} synthetic DX images and a {len(ct)}-slice head CT over"
          " C-STORE (storescu) ...")
    for files in (dx, ct):
        if files:
            subprocess.run(
                [STORESCU, "-aet", "DEMO_MODALITY", "-aec", "ORTHANC", "127.0.0.1",
                 str(args.dicom_port), *map(str, files)],
                check=True,
            )
    instance_ids = [_lookup(base_url, f) for f in dx]
    series_ids = sorted({_get(f"{base_url}/instances/{_lookup(base_url, f)}")["ParentSeries"]
                         for f in ct[:1]})
    if ct:
        print("Waiting for the CT series to become stable (StableAge) ...")
    jobs = wait_for_jobs(base_url, instance_ids, series_ids, timeout=args.timeout)
    print_table(base_url, jobs)
    print_comparisons(base_url, jobs)
    print_deliveries(base_url, jobs, timeout=120)
    from engine.demo import describe_audit, describe_ris

    print(f"\nThe demo RIS (HL7 over MLLP, 127.0.0.1:{ris.port}) received "
          f"{len(ris.received)} ORU^R01 message(s):")
    print("\n".join(describe_ris(ris)))
    time.sleep(2.0)  # the audit trail is shipped by a thread of each process
    print(f"\nThe demo audit repository (syslog RFC 5424 over TCP, 127.0.0.1:{audit.port}) "
          f"received {len(audit.messages)} DICOM audit message(s); the local chained log "
          f"is {data / 'orthanc-db' / 'orthanc-ai' / 'audit.log'} "
          f"(`orthanc-ai audit verify --data {data}`):")
    print("\n".join(describe_audit(audit)))
    if args.exit:
        return 0
    print(f"\nOrthanc keeps serving on {base_url} (Orthanc Explorer: "
          f"{base_url}/app/explorer.html). Ctrl-C stops it.")
    proc.wait()
    return proc.returncode or 0


def _lookup(base_url: str, path: Path) -> str:
    import pydicom

    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    return _post(f"{base_url}/tools/lookup", uid)[0]["ID"]


def _post(url: str, body: str) -> Any:
    import requests

    r = requests.post(url, data=body, timeout=10)
    r.raise_for_status()
    return r.json()


def print_table(base_url: str, jobs: list[dict]) -> None:
    rows = []
    for job in jobs:
        study = (_get(f"{base_url}/studies/{job['study']}") if job["study"]
                 else _get(f"{base_url}/instances/{job['instance']}/study"))
        patient = study.get("PatientMainDicomTags", {})
        result = job.get("result") or {}
        finding = result.get("finding", "")
        if result:
            finding = f"{finding} {'PRESENT' if result.get('positive') else 'absent'}"
            if result.get("volume_ml") is not None:
                finding += f" {result['volume_ml']:.1f} mL"
        rows.append(
            (
                f"{patient.get('PatientName', '')} ({patient.get('PatientID', '')})",
                study["MainDicomTags"].get("StudyDescription", "") or study["ID"][:8],
                job["state"] if job["state"] != "done" else finding,
                f"{result['probability']:.3f}" if "probability" in result else "",
                result.get("sr_sop_instance_uid", job.get("reason") or ""),
                f"{base_url}/app/explorer.html#study?uuid={study['ID']}",
            )
        )
    header = (
        "Patient", "Study", "Finding", "Probability", "SR SOP Instance UID", "Orthanc Explorer"
    )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)))
    print("\nIn OHIF, each result opened with its finding drawn (the CT on its key slice):")
    for job, row in zip(jobs, rows, strict=True):
        sr = (job.get("result") or {}).get("sr_instance")
        if sr:
            print(f"  {row[0]}  {row[2]}  {base_url}/{viewer_link(base_url, sr)}")
    print(f"AI status page: {base_url}/ai/")


def viewer_link(base_url: str, sr_instance: str) -> str:
    """The OHIF page that opens our SR (Orthanc ID) in its study."""
    from engine.ohif import study_link

    series = _get(f"{base_url}/instances/{sr_instance}/series")
    study = _get(f"{base_url}/studies/{series['ParentStudy']}")
    return study_link(study["MainDicomTags"]["StudyInstanceUID"],
                      series["MainDicomTags"]["SeriesInstanceUID"])


def print_comparisons(base_url: str, jobs: list[dict]) -> None:
    """The interval change of each result compared with a prior fetched from the PACS."""
    print("\nComparison with prior studies (AI.Priors):")
    for job in jobs:
        cmp = (job.get("result") or {}).get("comparison") or {}
        if cmp.get("state") != "compared":
            continue
        study = _get(f"{base_url}/studies/{job['study']}")
        name = study.get("PatientMainDicomTags", {}).get("PatientName", "")
        print(f"  {name}: {job['result']['finding']} {cmp['text']}; prior from "
              f"{cmp['prior_source']}, its SR {cmp.get('prior_sr') or '-'}")
    others = sorted({((j.get("result") or {}).get("comparison") or {}).get("reason", "")
                     for j in jobs} - {""})
    for reason in others:
        print(f"  other studies: {reason}")


def print_deliveries(base_url: str, jobs: list[dict], timeout: float) -> None:
    """How the SRs were forwarded (AI.Forward), once every delivery has settled."""
    srs = {(j.get("result") or {}).get("sr_instance") for j in jobs} - {None}
    deadline = time.time() + timeout
    while True:
        mine = [d for d in _get(f"{base_url}/ai/deliveries?limit=10000")
                if d["sr_instance"] in srs]
        if all(d["state"] in ("done", "dead") or (d["state"] == "failed" and not
                                                    d["next_attempt"]) for d in mine) \
                or time.time() > deadline:
            break
        time.sleep(0.5)
    by: dict[tuple[str, str], int] = {}
    for d in mine:
        by[(d["destination"], d["state"])] = by.get((d["destination"], d["state"]), 0) + 1
    print("\nSRs delivered (AI.Forward by C-STORE, AI.HL7 as ORU^R01): " + (", ".join(
        f"{n} {state} to {dest}" for (dest, state), n in sorted(by.items())) or "none"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="orthanc-ai", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from inference.version import __version__

    parser.add_argument("--version", action="version", version=f"orthanc-ai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    default_config = str(PROJECT_ROOT / "orthanc.json")
    for name in ("serve", "demo"):
        p = sub.add_parser(name)
        p.add_argument("--data", required=True, help="folder for all state (created)")
        p.add_argument("--http-port", type=int, default=8042)
        p.add_argument("--dicom-port", type=int, default=4242)
        p.add_argument("--config", default=default_config, help="base Orthanc configuration")
    sub.choices["serve"].add_argument(
        "--orthanc", choices=("debian", "current"),
        default=os.environ.get("ORTHANC_AI_ORTHANC", "debian"),
        help="debian: this machine's Orthanc; current: Orthanc 1.13 from Debian forky in "
             "build/orthanc-current (make current-orthanc); env ORTHANC_AI_ORTHANC")
    demo = sub.choices["demo"]
    demo.add_argument("--exit", action="store_true", help="exit after printing the results")
    demo.add_argument("--patients", type=int, default=4)
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--timeout", type=float, default=600)
    demo.add_argument("--no-ct", dest="ct", action="store_false",
                      help="radiographs only (no head CT series)")
    check = sub.add_parser("check-config")
    check.add_argument("--config", default=default_config)
    validate = sub.add_parser("validate-model")
    validate.add_argument("folder")
    from engine.audit.verify import add_parser as add_audit_parser
    from engine.audit.verify import cmd_verify

    add_audit_parser(sub)
    from inference import server as model_server

    model_server.add_arguments(sub.add_parser(
        "model-server", help="serve the models over HTTP (AI.Backend \"http\") for Orthancs "
                             "whose Python has no TensorFlow"))
    args = parser.parse_args(argv)
    handlers = {"serve": cmd_serve, "demo": cmd_demo, "check-config": cmd_check_config,
                "validate-model": cmd_validate_model, "audit": cmd_verify,
                "model-server": lambda a: model_server.main(args=a)}
    try:
        return handlers[args.command](args)
    except (ConfigError, RoutingError) as exc:
        print(f"orthanc-ai: configuration error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from inference.card import CardError

        if isinstance(exc, CardError):
            print(f"orthanc-ai: model error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
