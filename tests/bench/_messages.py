"""The messages a simulated agent sends: a hello with the inventory of an 8-GPU host and
telemetry samples shaped like those of a real 64-CPU, 8-GPU node.

Values come from a generator seeded by the agent's index, so every run (and both servers of one
run) receives the same messages apart from `collect_time`.
"""

from __future__ import annotations

import random
import uuid

from google.protobuf import struct_pb2
from sentinel.v1 import agent_pb2, fleet_pb2, telemetry_pb2

AGENT_VERSION = "0.1.0-bench"
CPUS = 64
GPUS = 8
GPU_NAME = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "550.54.15"
GPU_MEMORY = 85_899_345_920
GPU_RESERVED = 566_231_040
HOST_MEMORY = 2 * 1024**4
BOOT_TIME = 1_730_000_000
DISKS = ("nvme0n1", "nvme1n1", "nvme2n1", "nvme3n1")
FILESYSTEMS = (
    ("/", "/dev/nvme0n1p2", "ext4", 1_900_000_000_000),
    ("/boot/efi", "/dev/nvme0n1p1", "vfat", 536_000_000),
    ("/var/lib/containerd", "/dev/nvme1n1", "xfs", 3_840_000_000_000),
    ("/scratch", "/dev/md0", "xfs", 7_680_000_000_000),
    ("/dev/shm", "tmpfs", "tmpfs", HOST_MEMORY // 2),
    ("/run", "tmpfs", "tmpfs", 214_000_000_000),
)
NETWORKS = ("eth0", "ib0", "ib1", "docker0")


def node_id(index: int) -> str:
    """The node name of simulated agent `index` (1-based), as in its certificate."""
    return f"sim-{index:05d}"


def _gpu_identities(index: int) -> list[tuple[str, str]]:
    """(uuid, serial) of each GPU of agent `index`: the same in its hello and its telemetry."""
    rng = random.Random(index)
    return [
        (
            f"GPU-{uuid.UUID(int=rng.getrandbits(128))}",
            str(1_650_000_000_000 + rng.randrange(10**9)),
        )
        for _ in range(GPUS)
    ]


def hello(index: int) -> agent_pb2.ConnectRequest:
    """The first message of agent `index`'s session: a fresh agent with nothing spooled."""
    node = node_id(index)
    gpus = [
        fleet_pb2.GpuInventory(
            index=i,
            uuid=gpu_uuid,
            name=GPU_NAME,
            pci_bus_id=f"00000000:{0x18 + 0x10 * i:02X}:00.0",
            serial=serial,
            vbios_version="96.00.89.00.01",
            driver_version=DRIVER_VERSION,
            memory_total_bytes=GPU_MEMORY,
            power_limit_min_milliwatts=200_000,
            power_limit_max_milliwatts=700_000,
            power_limit_default_milliwatts=700_000,
            mig_mode="Disabled",
        )
        for i, (gpu_uuid, serial) in enumerate(_gpu_identities(index))
    ]
    return agent_pb2.ConnectRequest(
        hello=agent_pb2.Hello(
            node_id=node,
            agent_version=AGENT_VERSION,
            capabilities=["action:ping"],
            host=fleet_pb2.HostInventory(
                hostname=f"{node}.cluster.local",
                os="Ubuntu 22.04.4 LTS",
                kernel_version="5.15.0-105-generic",
                architecture="x86_64",
                logical_cpus=CPUS,
                physical_cpus=CPUS // 2,
                memory_total_bytes=HOST_MEMORY,
                boot_time_unix_seconds=BOOT_TIME,
            ),
            gpus=gpus,
            resume=agent_pb2.ResumeState(next_telemetry_seq=1, boot_count=1),
        )
    )


class TelemetrySource:
    """Produces agent `index`'s telemetry: one sample per call, seq counting up from 1.

    The sample is built once and mutated in place: a real agent's message changes in its
    counters and gauges, not in its shape, and rebuilding 2 KB of protobuf per send would make
    the simulator, not the server, the bottleneck.
    """

    def __init__(self, index: int, interval_s: float) -> None:
        self._rng = random.Random(index * 7919)
        self._interval_s = interval_s
        self._seq = 0
        node = node_id(index)
        rng = self._rng
        self.message = agent_pb2.ConnectRequest(
            telemetry=agent_pb2.TelemetryBatch(
                samples=[
                    telemetry_pb2.TelemetrySample(
                        node_id=node,
                        host=telemetry_pb2.HostTelemetry(
                            cpu=telemetry_pb2.CpuTelemetry(
                                user_seconds=rng.uniform(1e6, 5e7),
                                system_seconds=rng.uniform(1e5, 5e6),
                                idle_seconds=rng.uniform(1e7, 9e7),
                                iowait_seconds=rng.uniform(1e3, 1e5),
                                irq_seconds=rng.uniform(10, 1e3),
                                softirq_seconds=rng.uniform(1e3, 1e5),
                                nice_seconds=rng.uniform(0, 1e3),
                                per_cpu_utilization_percent=[0.0] * CPUS,
                                logical_cpus=CPUS,
                            ),
                            load=telemetry_pb2.LoadAverage(),
                            memory=telemetry_pb2.MemoryTelemetry(
                                total_bytes=HOST_MEMORY,
                                cached_bytes=rng.randrange(HOST_MEMORY // 8),
                                buffers_bytes=rng.randrange(2**33),
                            ),
                            disks=[
                                telemetry_pb2.DiskIoTelemetry(
                                    device=device,
                                    read_bytes=rng.randrange(10**12, 10**14),
                                    written_bytes=rng.randrange(10**12, 10**14),
                                    reads_completed=rng.randrange(10**8, 10**10),
                                    writes_completed=rng.randrange(10**8, 10**10),
                                    io_time_seconds=rng.uniform(1e4, 1e6),
                                )
                                for device in DISKS
                            ],
                            filesystems=[
                                telemetry_pb2.FilesystemTelemetry(
                                    mountpoint=mount,
                                    device=device,
                                    fstype=fstype,
                                    size_bytes=size,
                                    free_bytes=(free := rng.randrange(size // 10, size)),
                                    avail_bytes=max(free - size // 20, 0),
                                )
                                for mount, device, fstype, size in FILESYSTEMS
                            ],
                            networks=[
                                telemetry_pb2.NetworkTelemetry(
                                    interface=name,
                                    receive_bytes=rng.randrange(10**12, 10**15),
                                    transmit_bytes=rng.randrange(10**12, 10**15),
                                    receive_packets=rng.randrange(10**9, 10**12),
                                    transmit_packets=rng.randrange(10**9, 10**12),
                                    receive_errors=rng.randrange(100),
                                    receive_drops=rng.randrange(10_000),
                                    transmit_drops=rng.randrange(1_000),
                                )
                                for name in NETWORKS
                            ],
                            pressure=telemetry_pb2.PressureTelemetry(),
                            boot_time_unix_seconds=BOOT_TIME,
                        ),
                        gpus=[
                            telemetry_pb2.GpuTelemetry(
                                index=i,
                                uuid=gpu_uuid,
                                memory_total_bytes=GPU_MEMORY,
                                memory_reserved_bytes=GPU_RESERVED,
                                power_limit_milliwatts=700_000,
                                total_energy_millijoules=rng.randrange(10**10, 10**12),
                                ecc_corrected_volatile=rng.randrange(3),
                                unsupported=["fan_speed_percent"],
                            )
                            for i, (gpu_uuid, _serial) in enumerate(_gpu_identities(index))
                        ],
                        gpu_status=telemetry_pb2.GpuCollectionStatus(
                            state=telemetry_pb2.GPU_COLLECTION_STATE_OK,
                            driver_version=DRIVER_VERSION,
                            nvml_version=f"12.{DRIVER_VERSION}",
                        ),
                    )
                ]
            )
        )

    def next(self) -> agent_pb2.ConnectRequest:
        """Advances counters and gauges by one interval and returns the message to send."""
        self._seq += 1
        rng = self._rng
        dt = self._interval_s
        sample = self.message.telemetry.samples[0]
        sample.seq = self._seq
        sample.collect_time.GetCurrentTime()
        host = sample.host
        busy = rng.uniform(20.0, 95.0)
        cpu = host.cpu
        cpu.utilization_percent = busy
        cpu.user_seconds += CPUS * dt * busy / 100 * 0.9
        cpu.system_seconds += CPUS * dt * busy / 100 * 0.1
        cpu.idle_seconds += CPUS * dt * (1 - busy / 100)
        for i in range(CPUS):
            cpu.per_cpu_utilization_percent[i] = min(100.0, max(0.0, busy + rng.gauss(0, 8)))
        host.load.load1 = CPUS * busy / 100 + rng.uniform(-2, 2)
        host.load.load5 = host.load.load1 * 0.95
        host.load.load15 = host.load.load1 * 0.9
        memory = host.memory
        memory.used_bytes = int(HOST_MEMORY * rng.uniform(0.3, 0.8))
        memory.free_bytes = HOST_MEMORY - memory.used_bytes - memory.cached_bytes // 2
        memory.available_bytes = memory.free_bytes + memory.cached_bytes
        for disk in host.disks:
            disk.read_bytes += rng.randrange(10**9)
            disk.written_bytes += rng.randrange(10**9)
            disk.reads_completed += rng.randrange(10**5)
            disk.writes_completed += rng.randrange(10**5)
            disk.io_time_seconds += rng.uniform(0, dt)
        for network in host.networks:
            network.receive_bytes += rng.randrange(10**10)
            network.transmit_bytes += rng.randrange(10**10)
            network.receive_packets += rng.randrange(10**6)
            network.transmit_packets += rng.randrange(10**6)
        pressure = host.pressure
        pressure.cpu_some_avg10 = rng.uniform(0, 20)
        pressure.memory_some_avg10 = rng.uniform(0, 2)
        pressure.io_some_avg10 = rng.uniform(0, 5)
        pressure.io_full_avg10 = pressure.io_some_avg10 / 2
        pressure.cpu_some_total_seconds += rng.uniform(0, dt)
        pressure.io_full_total_seconds += rng.uniform(0, dt / 10)
        for gpu in sample.gpus:
            util = rng.randrange(60, 101)
            gpu.utilization_gpu_percent = util
            gpu.utilization_memory_percent = util * 2 // 3
            gpu.memory_used_bytes = rng.randrange(GPU_MEMORY // 2, GPU_MEMORY - GPU_RESERVED)
            gpu.memory_free_bytes = GPU_MEMORY - gpu.memory_used_bytes - gpu.memory_reserved_bytes
            gpu.sm_clock_mhz = rng.choice((1755, 1980))
            gpu.graphics_clock_mhz = gpu.sm_clock_mhz
            gpu.memory_clock_mhz = 2619
            gpu.temperature_celsius = rng.randrange(45, 80)
            gpu.power_usage_milliwatts = rng.randrange(250_000, 700_000)
            gpu.total_energy_millijoules += int(gpu.power_usage_milliwatts * dt)
            gpu.throttle_reasons = rng.choice((0, 0, 0, 1, 4))
            gpu.pcie_tx_kbps = rng.randrange(10**6)
            gpu.pcie_rx_kbps = rng.randrange(10**6)
        return self.message


def ping_output(node: str, command_id: str) -> struct_pb2.Struct:
    """What the simulated `ping` action returns."""
    output = struct_pb2.Struct()
    output.update({"pong": True, "node_id": node, "command_id": command_id})
    return output
