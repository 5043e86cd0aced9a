/**
 * A node's session with the witness: renews the node lease every 500 ms, keeps the newest record
 * the witness gave for each volume, and makes the grant calls for the replica controllers.
 *
 * The node lease is timed by lease.ts's holder rule: from when the heartbeat was SENT, counting
 * `leaseMs * (1 - drift)` on this node's monotonic clock. Each heartbeat reply carries the
 * witness's records of this node's volumes; they are learned before the lease is extended, so a
 * takeover the witness granted before that renewal is known here before this node acts on the
 * renewed lease (test/sim/witness.test.ts checks this rule).
 */
import { performance } from 'node:perf_hooks'
import { errorMessage } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import type {
  GrantRequest,
  HandoverGrantRequest,
  ReplaceRequest,
  ReportRequest,
  VolumeRecord,
} from '../witness/arbiter.js'
import { heartbeatIntervalMsDefault, holderLeaseEnd } from '../witness/lease.js'
import type { LeaseTiming } from '../witness/lease.js'
import type { WitnessClient } from '../witness/witness-service.js'

export interface WitnessSessionOptions {
  nodeName: string
  client: WitnessClient
  log: Logger
  intervalMs?: number
}

export class WitnessSession {
  private readonly records = new Map<string, VolumeRecord>()
  private readonly listeners = new Set<(record: VolumeRecord) => void>()
  private leaseEnd = 0
  private lastReply = -Infinity
  private timer: NodeJS.Timeout | undefined
  private inFlight = false
  private closed = false
  private failures = 0
  timing: LeaseTiming | undefined

  constructor(private readonly options: WitnessSessionOptions) {}

  get address(): string {
    return this.options.client.address
  }

  start(): void {
    const interval = this.options.intervalMs ?? heartbeatIntervalMsDefault
    this.timer = setInterval(() => {
      void this.beat()
    }, interval)
    this.timer.unref()
    void this.beat()
  }

  close(): void {
    this.closed = true
    clearInterval(this.timer)
    this.options.client.close()
  }

  /** This node's lease is valid (by its own clock). */
  leaseValid(now = performance.now()): boolean {
    return now < this.leaseEnd
  }

  leaseRemainingMs(now = performance.now()): number {
    return Math.max(0, this.leaseEnd - now)
  }

  /** A heartbeat was answered within the last two lease periods' worth of beats. */
  get reachable(): boolean {
    const interval = this.options.intervalMs ?? heartbeatIntervalMsDefault
    return performance.now() - this.lastReply < 3 * interval
  }

  record(volume: string): VolumeRecord | undefined {
    return this.records.get(volume)
  }

  /** Called with every record that is newer than the one known (by epoch or sync state). */
  onRecord(listener: (record: VolumeRecord) => void): () => void {
    this.listeners.add(listener)
    return () => this.listeners.delete(listener)
  }

  /** Waits (up to `timeoutMs`) for the first heartbeat reply; true if one came. */
  async ready(timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs
    while (this.lastReply === -Infinity && performance.now() < deadline && !this.closed) {
      await new Promise((resolve) => setTimeout(resolve, 50))
    }
    return this.lastReply !== -Infinity
  }

  async degrade(request: GrantRequest): Promise<VolumeRecord> {
    return this.learn(await this.options.client.degrade(request))
  }

  async takeover(request: GrantRequest): Promise<VolumeRecord> {
    return this.learn(await this.options.client.takeover(request))
  }

  async recordHandover(request: HandoverGrantRequest): Promise<VolumeRecord> {
    return this.learn(await this.options.client.recordHandover(request))
  }

  async replaceReplica(request: ReplaceRequest): Promise<VolumeRecord> {
    return this.learn(await this.options.client.replaceReplica(request))
  }

  async report(request: ReportRequest): Promise<VolumeRecord> {
    return this.learn(await this.options.client.report(request))
  }

  private async beat(): Promise<void> {
    if (this.inFlight || this.closed) return
    this.inFlight = true
    const sentAt = performance.now()
    try {
      const answer = await this.options.client.heartbeat(this.options.nodeName)
      for (const record of answer.volumes) this.learn(record)
      this.timing = answer.timing
      this.leaseEnd = Math.max(this.leaseEnd, holderLeaseEnd(sentAt, answer.timing))
      this.lastReply = performance.now()
      if (this.failures > 0)
        this.options.log.info('witness reachable again', { witness: this.address })
      this.failures = 0
    } catch (error) {
      this.failures += 1
      if (this.failures === 3) {
        this.options.log.warn('witness unreachable', {
          witness: this.address,
          error: errorMessage(error),
        })
      }
    } finally {
      this.inFlight = false
    }
  }

  private learn(record: VolumeRecord): VolumeRecord {
    const known = this.records.get(record.volume)
    const newer =
      known === undefined ||
      record.epoch > known.epoch ||
      (record.epoch === known.epoch &&
        (record.inSync !== known.inSync || record.owner !== known.owner))
    if (newer) {
      this.records.set(record.volume, record)
      for (const listener of this.listeners) listener(record)
    }
    return record
  }
}
