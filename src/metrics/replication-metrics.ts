/**
 * A node's replication metrics, read from its controllers at scrape time (health: role, state,
 * epoch, degraded, quorum, split brain, dirty and resync bytes, moves; the witness session), plus
 * the peer round-trip histogram the write path feeds (`peerRoundTripHistogram`). Counters that
 * the controllers already total are mirrored at each scrape.
 */
import { Counter, Gauge, Histogram } from 'prom-client'
import type { Registry } from 'prom-client'
import type { Replication } from '../daemon/replication.js'
import { replicationCodes } from '../replica/replication-types.js'
import { latencyBuckets } from './io-metrics.js'

/** Each replicated op's round trip to the peer (sent on the stream until acknowledged). */
export function peerRoundTripHistogram(registry: Registry): Histogram {
  return new Histogram({
    name: 'duplex_replication_peer_round_trip_seconds',
    help: 'Primary only: time from sending a replicated op to the peer until its ack',
    labelNames: ['volume'],
    buckets: latencyBuckets,
    registers: [registry],
  })
}

/** Per-volume replication health, read from the controllers at scrape time. */
export function registerReplicationMetrics(registry: Registry, replication: Replication): void {
  const roles = ['starting', 'primary', 'secondary', 'closed'] as const
  new Gauge({
    name: 'duplex_replica_role',
    help: "The role of this node's replica of a volume (1 for the current role)",
    labelNames: ['volume', 'role'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        for (const role of roles)
          this.set({ volume: status.volume, role }, status.role === role ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_epoch',
    help: 'The epoch this replica is in',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) this.set({ volume: status.volume }, status.epoch)
    },
  })
  new Gauge({
    name: 'duplex_replica_up_to_date',
    help: '1 if this replica is UpToDate, 0 while it is Inconsistent (being filled)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.state === 'UpToDate' ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replication_peer_connected',
    help: 'Primary only: 1 while the replication stream to the peer is open',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        if (status.role === 'primary')
          this.set({ volume: status.volume }, status.peerConnected ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replication_sync_remaining_bytes',
    help: 'Primary only: bytes of the running sync to the peer not yet copied',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        const remaining =
          status.peer === 'syncing' ? status.syncBytesTotal - status.syncBytesDone : 0
        this.set({ volume: status.volume }, remaining)
      }
    },
  })
  // Op and flush refusals, plus the Hello refusal a primary gets from a node that is not its
  // secondary (WRONG_SENDER and EPOCH_STALE count for Hellos too).
  const codes = [...replicationCodes, 'NOT_SECONDARY']
  new Counter({
    name: 'duplex_replication_rejected_messages_total',
    help: 'Replication messages this replica refused (never applied), by reason',
    labelNames: ['volume', 'code'],
    registers: [registry],
    collect() {
      // The controllers hold the running totals; the counter mirrors them at each scrape.
      this.reset()
      for (const status of replication.status()) {
        for (const code of codes)
          this.inc({ volume: status.volume, code }, status.rejected[code] ?? 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_degraded',
    help: 'Primary only: 1 while it runs alone by a witness grant (its peer lacks writes)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.degraded ? 1 : 0)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_quorum_lost',
    help: '1 while this replica may not serve (on-lost-quorum applies)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.quorumLost === undefined ? 0 : 1)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_split_brain',
    help: "1 while this replica's history forks from its peer's: no automatic resync",
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status()) {
        this.set({ volume: status.volume }, status.splitBrain === undefined ? 0 : 1)
      }
    },
  })
  new Gauge({
    name: 'duplex_replica_dirty_bytes',
    help: 'Bytes the peer lacks: regions written while running alone, not yet resynced',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      for (const status of replication.status())
        this.set({ volume: status.volume }, status.dirtyBytes)
    },
  })
  new Counter({
    name: 'duplex_replication_resync_bytes_total',
    help: 'Bytes copied to the peer by initial syncs and resyncs',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status())
        this.inc({ volume: status.volume }, status.resyncBytes)
    },
  })
  if (replication.witness !== undefined) {
    const witness = replication.witness
    new Gauge({
      name: 'duplex_witness_reachable',
      help: "1 while the witness answers this node's heartbeats",
      registers: [registry],
      collect() {
        this.set(witness.reachable ? 1 : 0)
      },
    })
    new Gauge({
      name: 'duplex_witness_lease_remaining_seconds',
      help: "Seconds left on this node's witness lease (by its own clock)",
      registers: [registry],
      collect() {
        this.set(witness.leaseRemainingMs() / 1000)
      },
    })
  }
  new Counter({
    name: 'duplex_replication_forwarded_writes_total',
    help: 'Primary only: writes forwarded by the peer node for its clients',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status()) {
        this.inc({ volume: status.volume }, status.forwardedWrites)
      }
    },
  })
  registerMoreReplicationMetrics(registry, replication)
}

/** What the health gauges above leave out: states by name, in-flight bytes, checksums, moves. */
function registerMoreReplicationMetrics(registry: Registry, replication: Replication): void {
  const states = ['UpToDate', 'Outdated', 'Inconsistent'] as const
  new Gauge({
    name: 'duplex_replica_state',
    help: "The state of this node's replica of a volume (1 for the current state)",
    labelNames: ['volume', 'state'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status()) {
        for (const state of states) {
          this.set({ volume: status.volume, state }, status.state === state ? 1 : 0)
        }
      }
    },
  })
  new Gauge({
    name: 'duplex_replication_inflight_bytes',
    help: 'Primary only: write payload bytes sent and not yet done on both replicas',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status()) {
        if (status.role === 'primary') this.set({ volume: status.volume }, status.inflightBytes)
      }
    },
  })
  new Counter({
    name: 'duplex_replication_checksum_failures_total',
    help: 'Primary only: payloads the peer refused for their xxh64 checksum (sent again)',
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status())
        this.inc({ volume: status.volume }, status.checksumRetries)
    },
  })
  new Gauge({
    name: 'duplex_replica_move_remaining_bytes',
    help: "Bytes of this node's replica still to copy to the node it moves to (0: not moving)",
    labelNames: ['volume'],
    registers: [registry],
    collect() {
      this.reset()
      for (const status of replication.status()) {
        const progress = replication.moveOf(status.volume)?.progress()
        this.set(
          { volume: status.volume },
          progress === undefined ? 0 : progress.total - progress.done,
        )
      }
    },
  })
}
