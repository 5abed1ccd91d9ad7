"""The plain values the collectors produce: host and GPU readings, inventory, collection status
and GPU events. They know nothing of the wire format; the agent encodes them for the session.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Values are frozen, except the records made many times per collection (one per GPU, disk,
# filesystem, network interface): a frozen dataclass's __init__ costs about four times as much
# (one object.__setattr__ per field), which showed in the agent's CPU per collection. Treat
# those as immutable all the same; nothing changes a value once a collector returned it.

# -- GPU ----------------------------------------------------------------------------------------


class GpuCollectionState(enum.Enum):
    """Why a GPU reading holds what it holds."""

    UNSPECIFIED = "unspecified"
    """Not started, or stopped."""
    OK = "ok"
    """GPUs were read."""
    NO_GPU = "no_gpu"
    """No NVIDIA driver or library on this node, or no GPU behind it."""
    ERROR = "error"
    """NVML answered with an error for the whole collection, or some GPU is lost."""
    TIMEOUT = "timeout"
    """An NVML call did not return within its deadline; collection is skipped until it does."""


@dataclass(frozen=True, slots=True)
class GpuStatus:
    """The state of GPU collection, in words a person can act on, with the driver's versions."""

    state: GpuCollectionState
    message: str = ""
    driver_version: str = ""
    """Empty until NVML has answered once."""
    nvml_version: str = ""


@dataclass(slots=True)
class GpuMetrics:
    """One GPU's readings from one collection; a field NVML could not read is 0 and named in
    `unsupported`."""

    index: int
    uuid: str
    utilization_gpu_percent: int = 0
    utilization_memory_percent: int = 0
    memory_total_bytes: int = 0
    memory_used_bytes: int = 0
    """Excludes what the driver reserves (`memory_reserved_bytes`)."""
    memory_free_bytes: int = 0
    memory_reserved_bytes: int = 0
    sm_clock_mhz: int = 0
    memory_clock_mhz: int = 0
    graphics_clock_mhz: int = 0
    temperature_celsius: int = 0
    power_usage_milliwatts: int = 0
    power_limit_milliwatts: int = 0
    total_energy_millijoules: int = 0
    """Since the driver was loaded."""
    throttle_reasons: int = 0
    """NVML clocks-event reason bitmask (nvmlClocksEventReason*)."""
    ecc_corrected_volatile: int = 0
    ecc_uncorrected_volatile: int = 0
    remapped_rows_correctable: int = 0
    remapped_rows_uncorrectable: int = 0
    remapped_rows_pending: bool = False
    fan_speed_percent: int = 0
    pcie_tx_kbps: int = 0
    pcie_rx_kbps: int = 0
    last_xid: int = 0
    """The last XID seen on this GPU since the collector started; 0 when none."""
    unsupported: tuple[str, ...] = ()
    """Names of the fields above that this GPU or driver could not read."""


@dataclass(frozen=True, slots=True)
class GpuInventoryItem:
    """What one GPU is: identity, board, driver and power-limit range; empty where unreadable."""

    index: int
    uuid: str
    name: str = ""
    pci_bus_id: str = ""
    serial: str = ""
    vbios_version: str = ""
    driver_version: str = ""
    memory_total_bytes: int = 0
    power_limit_min_milliwatts: int = 0
    power_limit_max_milliwatts: int = 0
    power_limit_default_milliwatts: int = 0
    mig_mode: str = ""
    """`Enabled`, `Disabled`, or empty where MIG is not supported."""


class GpuEventKind(enum.Enum):
    """What happened to a GPU."""

    XID = "xid"
    """The driver reported an XID (critical error) on the GPU."""
    ECC = "ecc"
    """A memory error the board cannot recover from by itself (row remapping failed)."""
    LOST = "lost"
    """The GPU stopped answering NVML; it needs a reset or a reboot."""


@dataclass(frozen=True, slots=True)
class GpuEvent:
    """One thing that happened to a GPU, reported once, when it was seen."""

    kind: GpuEventKind
    message: str
    time_ns: int
    """When the collector saw it, in nanoseconds since the Unix epoch."""
    gpu_index: int = 0
    """0 with an empty `gpu_uuid` when the driver named a GPU the collector does not know."""
    gpu_uuid: str = ""
    xid: int = 0
    """The XID number for XID events, else 0."""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU collection: why `gpus` is what it is, the GPUs read, and new events."""

    status: GpuStatus
    """State and a person-readable message; driver and NVML versions once known."""
    gpus: tuple[GpuMetrics, ...] = ()
    """The GPUs that answered; lost GPUs are left out (and named in `status`)."""
    events: tuple[GpuEvent, ...] = ()
    """XID, GPU-lost and ECC events seen since the previous reading, each reported once."""


# -- host ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostInventory:
    """What the host is: name, operating system, CPUs, memory and boot time."""

    hostname: str
    os: str
    kernel_version: str = ""
    architecture: str = ""
    logical_cpus: int = 0
    physical_cpus: int = 0
    memory_total_bytes: int = 0
    """0 when it could not be read."""
    boot_time_unix_seconds: int = 0
    """0 when it could not be read."""


@dataclass(frozen=True, slots=True)
class CpuTimes:
    """CPU seconds since boot by mode, summed over all CPUs, and the busy share since the
    previous reading (0 on the first)."""

    user_seconds: float
    system_seconds: float
    idle_seconds: float
    iowait_seconds: float
    irq_seconds: float
    softirq_seconds: float
    steal_seconds: float
    nice_seconds: float
    utilization_percent: float
    """Busy share of all CPUs together, 0..100."""
    per_cpu_utilization_percent: tuple[float, ...]
    """Busy share per logical CPU, index = CPU number."""
    logical_cpus: int


@dataclass(slots=True)
class CpuModeSeconds:
    """Seconds one logical CPU spent in each mode since boot, as /proc/stat counts them (user
    and nice include guest time); node_exporter's node_cpu_seconds_total for that CPU."""

    cpu: str
    """The kernel's CPU number ("0", "1", ...); an offline CPU is absent, not renumbered."""
    user: float
    nice: float
    system: float
    idle: float
    iowait: float
    irq: float
    softirq: float
    steal: float


@dataclass(frozen=True, slots=True)
class LoadAverage:
    """The 1, 5 and 15 minute load averages."""

    load1: float
    load5: float
    load15: float


@dataclass(frozen=True, slots=True)
class MemoryUsage:
    """RAM and swap, in bytes; fields a platform lacks are 0."""

    total_bytes: int
    available_bytes: int
    used_bytes: int
    free_bytes: int
    cached_bytes: int = 0
    """/proc/meminfo's Cached: the page cache, without reclaimable slab (psutil adds that)."""
    buffers_bytes: int = 0
    swap_total_bytes: int = 0
    swap_used_bytes: int = 0
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0


@dataclass(slots=True)
class DiskIo:
    """I/O counters since boot of one block device."""

    device: str
    read_bytes: int
    written_bytes: int
    reads_completed: int
    writes_completed: int
    io_time_seconds: float


@dataclass(slots=True)
class FilesystemUsage:
    """Size and free space of one mounted filesystem."""

    mountpoint: str
    device: str
    fstype: str
    size_bytes: int
    free_bytes: int
    """Free blocks, including those reserved for root."""
    avail_bytes: int
    """What unprivileged users may still use."""


@dataclass(slots=True)
class NetworkIo:
    """Counters since boot of one network interface."""

    interface: str
    receive_bytes: int
    transmit_bytes: int
    receive_packets: int
    transmit_packets: int
    receive_errors: int
    transmit_errors: int
    receive_drops: int
    transmit_drops: int


@dataclass(frozen=True, slots=True)
class Pressure:
    """Pressure stall information (/proc/pressure): 10 s averages in percent, totals in seconds;
    0 for a resource the kernel did not report."""

    cpu_some_avg10: float = 0.0
    memory_some_avg10: float = 0.0
    memory_full_avg10: float = 0.0
    io_some_avg10: float = 0.0
    io_full_avg10: float = 0.0
    cpu_some_total_seconds: float = 0.0
    memory_full_total_seconds: float = 0.0
    io_full_total_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class HostSnapshot:
    """One host collection; a part that could not be read is None (or empty), the rest stands."""

    cpu: CpuTimes | None = None
    load: LoadAverage | None = None
    memory: MemoryUsage | None = None
    disks: tuple[DiskIo, ...] = ()
    filesystems: tuple[FilesystemUsage, ...] = ()
    networks: tuple[NetworkIo, ...] = ()
    pressure: Pressure | None = None
    """None where the kernel has no pressure stall information (PSI)."""
    boot_time_unix_seconds: int = 0
    """0 when it could not be read."""
