#!/usr/bin/env python3
"""hull-vmm vs QEMU microvm, both on KVM, booting the project's probe guest (vmm/probe).

Per run, alternating the two VMMs (medians of N, default 10):
  - spawn -> first guest output on the serial port (wall ms), and the VMM's CPU ms by then
    (sum over its threads, /proc/PID/task/*/schedstat); for hull-vmm also spawn -> its
    first KVM_RUN (HULL_VMM_TIMING=1);
  - memory with a 128 MiB guest once the probe is done (halted): VmRSS and its parts
    (RssAnon + RssFile = the VMM itself; RssShmem = guest memory touched, memfd-backed
    in both);
  - vsock through the probe's echo: round-trip latency of 1 byte (median of 200) and
    echo throughput of 1 MiB. hull-vmm: its own virtio-vsock (hybrid Unix socket); QEMU:
    vhost-user-vsock-device with vhost-device-vsock (what Hull's QEMU backend uses).

QEMU boots the probe through its PVH note (QEMU's -kernel takes PVH ELFs only); hull-vmm
through the Linux 64-bit entry. Usage: benches/vmm.py [N]   (after scripts/setup.sh;
needs /dev/kvm)
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VMM = os.path.join(ROOT, "target/release/hull-vmm")
MEM_MIB = 128


def build_probe(out, pvh):
    env = dict(os.environ, PROBE_PVH="1" if pvh else "0")
    subprocess.run(["sh", os.path.join(ROOT, "vmm/probe/build.sh"), out], check=True, env=env)


def cpu_ms(pid):
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        pass
    return total / 1e6


def rss(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) / 1024
    return out


def wait_for(path, text, proc, limit=60):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as f:
                if text in f.read():
                    return time.monotonic()
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"VMM exited ({proc.returncode}) before {text!r}")
        time.sleep(0.0005)
    raise RuntimeError(f"no {text!r} within {limit} s")


def start_hull(work, probe, cmdline, vsock_uds):
    import json
    cfg = {
        "vcpus": 1,
        "memory_mib": MEM_MIB,
        "kernel": probe,
        "cmdline": cmdline,
        "serial": {"output": os.path.join(work, "console.log")},
    }
    if vsock_uds:
        cfg["vsock"] = {"cid": 3, "uds": vsock_uds}
    path = os.path.join(work, "vm.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, HULL_VMM_TIMING="1")
    t0 = time.monotonic()
    p = subprocess.Popen([VMM, "--config", path], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return p, t0, []


def start_qemu(work, probe, cmdline, vsock_uds):
    helpers = []
    args = [
        "qemu-system-x86_64", "-M",
        "microvm,x-option-roms=off,isa-serial=on,rtc=off,acpi=off,memory-backend=mem",
        "-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M,share=on",
        "-m", f"{MEM_MIB}M", "-smp", "1", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-nodefaults", "-no-user-config", "-display", "none", "-monitor", "none",
        "-no-reboot", "-global", "virtio-mmio.force-legacy=false", "-serial", f"file:{os.path.join(work, 'console.log')}",
        "-kernel", probe, "-append", cmdline,
    ]
    if vsock_uds:
        backend = os.path.join(work, "vsock-backend.sock")
        h = subprocess.Popen(["vhost-device-vsock", "--guest-cid=3", f"--socket={backend}",
                              f"--uds-path={vsock_uds}"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        helpers.append(h)
        while not os.path.exists(backend):
            time.sleep(0.001)
        args += ["-chardev", f"socket,id=vsock0,path={backend}",
                 "-device", "vhost-user-vsock-device,chardev=vsock0"]
    t0 = time.monotonic()
    p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    return p, t0, helpers


def stop(p, helpers):
    for h in [p] + helpers:
        if h.poll() is None:
            h.kill()
        h.wait()


def boot_run(start, probe):
    work = tempfile.mkdtemp(prefix="hull-bench-vmm-")
    try:
        p, t0, helpers = start(work, probe, "probe.end=halt", None)
        console = os.path.join(work, "console.log")
        first = wait_for(console, b"HULL-PROBE start", p)
        cpu = cpu_ms(p.pid)
        wait_for(console, b"HULL-PROBE done", p)
        time.sleep(0.2)
        mem = rss(p.pid)
        stop(p, helpers)
        kvm_run = None
        if p.stderr:
            for line in p.stderr.read().decode().splitlines():
                if "first KVM_RUN" in line:
                    ns = int(line.split("monotonic_ns=")[1].split()[0])
                    kvm_run = ns / 1e6 - t0 * 1e3
        return {"first_output_ms": (first - t0) * 1e3, "cpu_ms": cpu, "kvm_run_ms": kvm_run, **mem}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def vsock_run(start, probe):
    work = tempfile.mkdtemp(prefix="hull-bench-vsock-")
    uds = os.path.join(work, "v.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(uds + "_1234")
    listener.listen(1)
    listener.settimeout(20)
    p, _, helpers = start(work, probe, "probe.vsock_port=1234 probe.end=halt", uds)
    try:
        conn, _ = listener.accept()
        conn.settimeout(60)
        rtts = []
        for _ in range(200):
            t = time.monotonic()
            conn.sendall(b"x")
            if conn.recv(1) != b"x":
                raise RuntimeError("echo mismatch")
            rtts.append((time.monotonic() - t) * 1e6)
        data = os.urandom(1 << 20)
        got = bytearray()
        t = time.monotonic()
        sender = threading.Thread(target=conn.sendall, args=(data,))
        sender.start()
        while len(got) < len(data):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            got += chunk
        sender.join()
        secs = time.monotonic() - t
        if bytes(got) != data:
            raise RuntimeError("throughput echo mismatch")
        conn.close()
        return {"rtt_us": statistics.median(rtts), "echo_mib_s": len(data) / secs / (1 << 20)}
    finally:
        stop(p, helpers)
        listener.close()
        shutil.rmtree(work, ignore_errors=True)


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    tmp = tempfile.mkdtemp(prefix="hull-bench-probe-")
    probe, probe_pvh = os.path.join(tmp, "probe.elf"), os.path.join(tmp, "probe-pvh.elf")
    build_probe(probe, False)
    build_probe(probe_pvh, True)
    results = {"hull-vmm": [], "qemu": []}
    vsock = {"hull-vmm": [], "qemu": []}
    for _ in range(n):
        results["hull-vmm"].append(boot_run(start_hull, probe))
        results["qemu"].append(boot_run(start_qemu, probe_pvh))
    failed = {"hull-vmm": 0, "qemu": 0}
    for _ in range(max(1, n // 3)):
        for name, start, image in (("hull-vmm", start_hull, probe), ("qemu", start_qemu, probe_pvh)):
            try:
                vsock[name].append(vsock_run(start, image))
            except (OSError, RuntimeError) as e:
                failed[name] += 1
                print(f"{name}: vsock run failed: {e}", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)

    def med(rows, key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"# hull-vmm vs QEMU microvm (KVM), probe guest, {MEM_MIB} MiB, medians of {n} "
          f"(vsock: {len(vsock['hull-vmm'])} + {len(vsock['qemu'])}; failed runs: {failed})")
    print(f"{'figure':44} {'hull-vmm':>10} {'qemu':>10} {'ratio':>8}")
    rows = [
        ("spawn -> first KVM_RUN (ms)", "kvm_run_ms", results, False),
        ("spawn -> first guest serial output (ms)", "first_output_ms", results, True),
        ("VMM CPU by first guest output (ms)", "cpu_ms", results, True),
        ("VmRSS, guest halted (MiB)", "VmRSS", results, True),
        ("  RssAnon+RssFile: the VMM itself (MiB)", "own", results, True),
        ("    RssAnon: private to this VMM (MiB)", "RssAnon", results, True),
        ("    RssFile: binary and libraries (MiB)", "RssFile", results, True),
        ("  RssShmem: guest memory touched (MiB)", "RssShmem", results, True),
        ("vsock 1-byte echo round trip (us)", "rtt_us", vsock, True),
        ("vsock echo throughput, 1 MiB (MiB/s)", "echo_mib_s", vsock, True),
    ]
    for rs in results.values():
        for r in rs:
            r["own"] = r["RssAnon"] + r["RssFile"]
    for label, key, table, both in rows:
        h = med(table["hull-vmm"], key)
        q = med(table["qemu"], key) if both else float("nan")
        ratio = f"{h / q:8.2f}" if both and q == q and q else "       -"
        qs = f"{q:10.2f}" if both else "         -"
        print(f"{label:44} {h:10.2f} {qs} {ratio}")


if __name__ == "__main__":
    main()
