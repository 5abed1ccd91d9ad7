"""Plain values → protobuf: encodes what the collectors read into the messages the agent sends
(the telemetry sample, the inventory in the hello, GPU events). The one place where collector
values meet the wire format; each message is built once, in place, with no intermediate copy.
"""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf import timestamp_pb2
from sentinel.v1 import agent_pb2, fleet_pb2, telemetry_pb2

from nodeagent.collectors import (
    GpuCollectionState,
    GpuEvent,
    GpuEventKind,
    GpuInventoryItem,
    GpuReading,
    GpuStatus,
    HostInventory,
    HostSnapshot,
)

_GPU_STATES: dict[GpuCollectionState, telemetry_pb2.GpuCollectionState.ValueType] = {
    GpuCollectionState.UNSPECIFIED: telemetry_pb2.GPU_COLLECTION_STATE_UNSPECIFIED,
    GpuCollectionState.OK: telemetry_pb2.GPU_COLLECTION_STATE_OK,
    GpuCollectionState.NO_GPU: telemetry_pb2.GPU_COLLECTION_STATE_NO_GPU,
    GpuCollectionState.ERROR: telemetry_pb2.GPU_COLLECTION_STATE_ERROR,
    GpuCollectionState.TIMEOUT: telemetry_pb2.GPU_COLLECTION_STATE_TIMEOUT,
}

_EVENT_KINDS: dict[GpuEventKind, agent_pb2.AgentEventKind.ValueType] = {
    GpuEventKind.XID: agent_pb2.AGENT_EVENT_KIND_GPU_XID,
    GpuEventKind.ECC: agent_pb2.AGENT_EVENT_KIND_GPU_ECC,
    GpuEventKind.LOST: agent_pb2.AGENT_EVENT_KIND_GPU_LOST,
}


def gpu_state_name(state: GpuCollectionState) -> str:
    """The state's name in the API, e.g. GPU_COLLECTION_STATE_NO_GPU (for logs)."""
    return telemetry_pb2.GpuCollectionState.Name(_GPU_STATES[state])


def telemetry_sample(
    seq: int,
    node_id: str,
    collect_time_ns: int,
    host: HostSnapshot | None,
    gpu: GpuReading,
) -> telemetry_pb2.TelemetrySample:
    """The sample the spool stores and the session sends; without host telemetry when `host`
    is None."""
    sample = telemetry_pb2.TelemetrySample(seq=seq, node_id=node_id)
    sample.collect_time.FromNanoseconds(collect_time_ns)
    if host is not None:
        _fill_host(sample.host, host)
    add_gpu = sample.gpus.add
    for metrics in gpu.gpus:
        add_gpu(
            index=metrics.index,
            uuid=metrics.uuid,
            utilization_gpu_percent=metrics.utilization_gpu_percent,
            utilization_memory_percent=metrics.utilization_memory_percent,
            memory_total_bytes=metrics.memory_total_bytes,
            memory_used_bytes=metrics.memory_used_bytes,
            memory_free_bytes=metrics.memory_free_bytes,
            memory_reserved_bytes=metrics.memory_reserved_bytes,
            sm_clock_mhz=metrics.sm_clock_mhz,
            memory_clock_mhz=metrics.memory_clock_mhz,
            graphics_clock_mhz=metrics.graphics_clock_mhz,
            temperature_celsius=metrics.temperature_celsius,
            power_usage_milliwatts=metrics.power_usage_milliwatts,
            power_limit_milliwatts=metrics.power_limit_milliwatts,
            total_energy_millijoules=metrics.total_energy_millijoules,
            throttle_reasons=metrics.throttle_reasons,
            ecc_corrected_volatile=metrics.ecc_corrected_volatile,
            ecc_uncorrected_volatile=metrics.ecc_uncorrected_volatile,
            remapped_rows_correctable=metrics.remapped_rows_correctable,
            remapped_rows_uncorrectable=metrics.remapped_rows_uncorrectable,
            remapped_rows_pending=metrics.remapped_rows_pending,
            fan_speed_percent=metrics.fan_speed_percent,
            pcie_tx_kbps=metrics.pcie_tx_kbps,
            pcie_rx_kbps=metrics.pcie_rx_kbps,
            last_xid=metrics.last_xid,
            unsupported=metrics.unsupported,
        )
    _fill_gpu_status(sample.gpu_status, gpu.status)
    return sample


def _fill_gpu_status(message: telemetry_pb2.GpuCollectionStatus, status: GpuStatus) -> None:
    message.SetInParent()
    message.state = _GPU_STATES[status.state]
    message.message = status.message
    message.driver_version = status.driver_version
    message.nvml_version = status.nvml_version


def _fill_host(message: telemetry_pb2.HostTelemetry, host: HostSnapshot) -> None:
    # Presence matters: a part that was read is present even when all its values are zero.
    message.SetInParent()
    cpu = host.cpu
    if cpu is not None:
        cpu_message = message.cpu
        cpu_message.SetInParent()
        cpu_message.user_seconds = cpu.user_seconds
        cpu_message.system_seconds = cpu.system_seconds
        cpu_message.idle_seconds = cpu.idle_seconds
        cpu_message.iowait_seconds = cpu.iowait_seconds
        cpu_message.irq_seconds = cpu.irq_seconds
        cpu_message.softirq_seconds = cpu.softirq_seconds
        cpu_message.steal_seconds = cpu.steal_seconds
        cpu_message.nice_seconds = cpu.nice_seconds
        cpu_message.utilization_percent = cpu.utilization_percent
        cpu_message.per_cpu_utilization_percent.extend(cpu.per_cpu_utilization_percent)
        cpu_message.logical_cpus = cpu.logical_cpus
    load = host.load
    if load is not None:
        load_message = message.load
        load_message.SetInParent()
        load_message.load1 = load.load1
        load_message.load5 = load.load5
        load_message.load15 = load.load15
    memory = host.memory
    if memory is not None:
        memory_message = message.memory
        memory_message.SetInParent()
        memory_message.total_bytes = memory.total_bytes
        memory_message.available_bytes = memory.available_bytes
        memory_message.used_bytes = memory.used_bytes
        memory_message.free_bytes = memory.free_bytes
        memory_message.cached_bytes = memory.cached_bytes
        memory_message.buffers_bytes = memory.buffers_bytes
        memory_message.swap_total_bytes = memory.swap_total_bytes
        memory_message.swap_used_bytes = memory.swap_used_bytes
        memory_message.swap_in_bytes = memory.swap_in_bytes
        memory_message.swap_out_bytes = memory.swap_out_bytes
    add_disk = message.disks.add
    for disk in host.disks:
        add_disk(
            device=disk.device,
            read_bytes=disk.read_bytes,
            written_bytes=disk.written_bytes,
            reads_completed=disk.reads_completed,
            writes_completed=disk.writes_completed,
            io_time_seconds=disk.io_time_seconds,
        )
    add_filesystem = message.filesystems.add
    for filesystem in host.filesystems:
        add_filesystem(
            mountpoint=filesystem.mountpoint,
            device=filesystem.device,
            fstype=filesystem.fstype,
            size_bytes=filesystem.size_bytes,
            free_bytes=filesystem.free_bytes,
            avail_bytes=filesystem.avail_bytes,
        )
    add_network = message.networks.add
    for network in host.networks:
        add_network(
            interface=network.interface,
            receive_bytes=network.receive_bytes,
            transmit_bytes=network.transmit_bytes,
            receive_packets=network.receive_packets,
            transmit_packets=network.transmit_packets,
            receive_errors=network.receive_errors,
            transmit_errors=network.transmit_errors,
            receive_drops=network.receive_drops,
            transmit_drops=network.transmit_drops,
        )
    pressure = host.pressure
    if pressure is not None:
        pressure_message = message.pressure
        pressure_message.SetInParent()
        pressure_message.cpu_some_avg10 = pressure.cpu_some_avg10
        pressure_message.memory_some_avg10 = pressure.memory_some_avg10
        pressure_message.memory_full_avg10 = pressure.memory_full_avg10
        pressure_message.io_some_avg10 = pressure.io_some_avg10
        pressure_message.io_full_avg10 = pressure.io_full_avg10
        pressure_message.cpu_some_total_seconds = pressure.cpu_some_total_seconds
        pressure_message.memory_full_total_seconds = pressure.memory_full_total_seconds
        pressure_message.io_full_total_seconds = pressure.io_full_total_seconds
    message.boot_time_unix_seconds = host.boot_time_unix_seconds


def host_inventory(
    inventory: HostInventory, kubernetes_node_name: str = ""
) -> fleet_pb2.HostInventory:
    """The host part of the hello, with the Kubernetes node this host is (if set)."""
    return fleet_pb2.HostInventory(
        kubernetes_node_name=kubernetes_node_name,
        hostname=inventory.hostname,
        os=inventory.os,
        kernel_version=inventory.kernel_version,
        architecture=inventory.architecture,
        logical_cpus=inventory.logical_cpus,
        physical_cpus=inventory.physical_cpus,
        memory_total_bytes=inventory.memory_total_bytes,
        boot_time_unix_seconds=inventory.boot_time_unix_seconds,
    )


def gpu_inventory(items: Sequence[GpuInventoryItem]) -> list[fleet_pb2.GpuInventory]:
    """The GPU part of the hello, one entry per readable GPU."""
    return [
        fleet_pb2.GpuInventory(
            index=item.index,
            uuid=item.uuid,
            name=item.name,
            pci_bus_id=item.pci_bus_id,
            serial=item.serial,
            vbios_version=item.vbios_version,
            driver_version=item.driver_version,
            memory_total_bytes=item.memory_total_bytes,
            power_limit_min_milliwatts=item.power_limit_min_milliwatts,
            power_limit_max_milliwatts=item.power_limit_max_milliwatts,
            power_limit_default_milliwatts=item.power_limit_default_milliwatts,
            mig_mode=item.mig_mode,
        )
        for item in items
    ]


def event_request(event: GpuEvent) -> agent_pb2.ConnectRequest:
    """The session message that reports one GPU event."""
    request = agent_pb2.ConnectRequest()
    message = request.event
    message.kind = _EVENT_KINDS[event.kind]
    message.event_time.FromNanoseconds(event.time_ns)
    message.gpu_index = event.gpu_index
    message.gpu_uuid = event.gpu_uuid
    message.xid = event.xid
    message.message = event.message
    return request


def now_timestamp() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    timestamp = timestamp_pb2.Timestamp()
    timestamp.GetCurrentTime()
    return timestamp
