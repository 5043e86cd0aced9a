/**
 * `duplex witness`: the third-site daemon's composition root. Loads its durable records, runs the
 * arbiter (src/witness/arbiter.ts) behind the Witness gRPC service, and exposes /metrics.
 *
 * Every decision runs alone, in arrival order: decide on the current state with the current
 * monotonic time, make the change durable (synced RocksDB batch), apply it, answer. Two requests
 * can therefore never be granted against the same state. If the store fails, the witness grants
 * nothing more until it is restarted (it cannot know what is durable).
 */
import type { AddressInfo } from 'node:net'
import { performance } from 'node:perf_hooks'
import * as grpc from '@grpc/grpc-js'
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client'
import { DuplexError, errorMessage } from '../core/errors.js'
import { formatEpoch } from '../core/epochs.js'
import type { Logger } from '../core/log.js'
import { MetricsServer } from '../metrics/http.js'
import { Arbiter } from '../witness/arbiter.js'
import type { Decision, VolumeRecord } from '../witness/arbiter.js'
import { nodeLeaseDefaults } from '../witness/lease.js'
import type { LeaseTiming } from '../witness/lease.js'
import { addWitnessService, witnessServerOptions } from '../witness/witness-service.js'
import type { HeartbeatAnswer, WitnessHandlers, WitnessStatus } from '../witness/witness-service.js'
import { WitnessStore } from '../witness/witness-store.js'

export interface WitnessOptions {
  name: string
  dataDir: string
  listen: { host: string; port: number }
  metricsListen?: { host: string; port: number }
  timing?: LeaseTiming
  log: Logger
}

export interface RunningWitness {
  address: AddressInfo
  metricsAddress: AddressInfo | undefined
  stop(): Promise<void>
}

type Kind = 'report' | 'degrade' | 'takeover' | 'handover'

/** The handlers: the arbiter, one decision at a time, durable before it answers. */
class Witness implements WitnessHandlers {
  private tail: Promise<unknown> = Promise.resolve()
  private storeFailure: string | undefined
  readonly grants = new Map<Kind, number>()
  readonly refusals = new Map<string, number>()

  constructor(
    readonly arbiter: Arbiter,
    private readonly store: WitnessStore,
    private readonly log: Logger,
  ) {}

  heartbeat(node: string): Promise<HeartbeatAnswer> {
    const now = performance.now()
    if (!this.arbiter.heartbeat(node, now)) {
      const message = `the witness tracks leases for too many nodes; ${node} is refused`
      return Promise.reject(new DuplexError('UNAVAILABLE', message))
    }
    return Promise.resolve({
      timing: this.arbiter.timing,
      volumes: this.arbiter.recordsOf(node),
    })
  }

  report(request: Parameters<WitnessHandlers['report']>[0]): Promise<VolumeRecord> {
    return this.decide('report', () => this.arbiter.report(request))
  }

  degrade(request: Parameters<WitnessHandlers['degrade']>[0]): Promise<VolumeRecord> {
    return this.decide('degrade', (now) => this.arbiter.degrade(request, now))
  }

  takeover(request: Parameters<WitnessHandlers['takeover']>[0]): Promise<VolumeRecord> {
    return this.decide('takeover', (now) => this.arbiter.takeover(request, now))
  }

  recordHandover(request: Parameters<WitnessHandlers['recordHandover']>[0]): Promise<VolumeRecord> {
    return this.decide('handover', (now) => this.arbiter.handover(request, now))
  }

  status(): Promise<WitnessStatus> {
    const now = performance.now()
    return Promise.resolve({
      volumes: this.arbiter.allRecords(),
      leases: this.arbiter
        .leases(now)
        .map((lease) => ({ node: lease.node, remainingMs: Math.ceil(lease.remainingMs) })),
      quietMs: Math.max(0, Math.ceil(this.arbiter.quietUntil - now)),
      timing: this.arbiter.timing,
    })
  }

  /** Waits for the decisions under way (a clean stop answers them first). */
  async drained(): Promise<void> {
    await this.tail
  }

  private decide(kind: Kind, decide: (now: number) => Decision): Promise<VolumeRecord> {
    const result = this.tail.then(async () => {
      if (this.storeFailure !== undefined) {
        throw new DuplexError('IO_ERROR', `the witness's store failed: ${this.storeFailure}`)
      }
      const decision = decide(performance.now())
      if (!decision.ok) {
        const key = `${kind} ${decision.code}`
        this.refusals.set(key, (this.refusals.get(key) ?? 0) + 1)
        if (kind !== 'report') {
          this.log.info('refused', { kind, code: decision.code, why: decision.message })
        }
        throw new DuplexError(decision.code, decision.message)
      }
      const { change } = decision
      if (change !== undefined) {
        try {
          await this.store.put(change)
        } catch (error) {
          this.storeFailure = errorMessage(error)
          this.log.error('cannot make a decision durable; granting nothing more', {
            error: this.storeFailure,
          })
          throw new DuplexError('IO_ERROR', `the witness cannot record ${change.volume}`)
        }
        this.arbiter.apply(change)
        this.grants.set(kind, (this.grants.get(kind) ?? 0) + 1)
        this.log.info(kind === 'report' ? 'recorded' : 'granted', {
          kind,
          volume: change.volume,
          epoch: formatEpoch(change.epoch),
          owner: change.owner,
          inSync: change.inSync,
        })
      }
      return decision.record
    })
    this.tail = result.catch(() => undefined)
    return result
  }
}

export async function startWitness(options: WitnessOptions): Promise<RunningWitness> {
  const { log } = options
  const timing = options.timing ?? nodeLeaseDefaults
  const store = await WitnessStore.open(options.dataDir)
  let records: VolumeRecord[]
  try {
    records = await store.load()
  } catch (error) {
    await store.close()
    throw error
  }
  const arbiter = new Arbiter(timing, records, performance.now())
  const witness = new Witness(arbiter, store, log)
  log.info('loaded', {
    volumes: records.length,
    grantsPausedMs: Math.round(arbiter.quietUntil - performance.now()),
  })

  const server = new grpc.Server(witnessServerOptions)
  addWitnessService(server, witness, log.child('rpc'))
  const registry = new Registry()
  registry.setDefaultLabels({ witness: options.name })
  collectDefaultMetrics({ register: registry })
  registerWitnessMetrics(registry, witness)
  const metrics = new MetricsServer(registry, log.child('metrics'))

  let address: AddressInfo
  let metricsAddress: AddressInfo | undefined
  try {
    const { host, port } = options.listen
    const bound = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`${host}:${port}`, grpc.ServerCredentials.createInsecure(), (error, p) => {
        if (error !== null) {
          reject(
            new DuplexError('UNAVAILABLE', `cannot listen on ${host}:${port}: ${error.message}`),
          )
        } else {
          resolve(p)
        }
      })
    })
    address = { address: host, port: bound, family: host.includes(':') ? 'IPv6' : 'IPv4' }
    if (options.metricsListen !== undefined) {
      metricsAddress = await metrics.listen(options.metricsListen.host, options.metricsListen.port)
    }
  } catch (error) {
    server.forceShutdown()
    await store.close()
    throw error
  }

  let stopping: Promise<void> | undefined
  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      log.info('stopping')
      await new Promise<void>((resolve) => {
        server.tryShutdown(() => {
          resolve()
        })
        setTimeout(() => {
          server.forceShutdown()
          resolve()
        }, 2000).unref()
      })
      await witness.drained()
      if (metricsAddress !== undefined) await metrics.close()
      await store.close()
      log.info('stopped cleanly')
    })()
    return stopping
  }
  return { address, metricsAddress, stop }
}

function registerWitnessMetrics(registry: Registry, witness: Witness): void {
  new Counter({
    name: 'duplex_witness_grants_total',
    help: 'Decisions the witness made durable: degrade, takeover and handover grants, and reports that changed a record',
    labelNames: ['kind'],
    registers: [registry],
    collect() {
      this.reset()
      for (const kind of ['report', 'degrade', 'takeover', 'handover'] as const) {
        this.inc({ kind }, witness.grants.get(kind) ?? 0)
      }
    },
  })
  new Counter({
    name: 'duplex_witness_refusals_total',
    help: 'Requests the witness refused, by kind and error code',
    labelNames: ['kind', 'code'],
    registers: [registry],
    collect() {
      this.reset()
      for (const [key, count] of witness.refusals) {
        const [kind = '', code = ''] = key.split(' ')
        this.inc({ kind, code }, count)
      }
    },
  })
  new Gauge({
    name: 'duplex_witness_node_lease_remaining_seconds',
    help: 'Seconds until the witness considers a node gone (0: gone)',
    labelNames: ['node'],
    registers: [registry],
    collect() {
      this.reset()
      for (const lease of witness.arbiter.leases(performance.now())) {
        this.set({ node: lease.node }, lease.remainingMs / 1000)
      }
    },
  })
  new Gauge({
    name: 'duplex_witness_volumes',
    help: 'Volumes the witness arbitrates, by state (in_sync, degraded)',
    labelNames: ['state'],
    registers: [registry],
    collect() {
      const records = witness.arbiter.allRecords()
      const inSync = records.filter((record) => record.inSync).length
      this.set({ state: 'in_sync' }, inSync)
      this.set({ state: 'degraded' }, records.length - inSync)
    },
  })
  new Gauge({
    name: 'duplex_witness_grants_paused',
    help: '1 while a restarted witness waits one lease period before granting',
    registers: [registry],
    collect() {
      this.set(performance.now() < witness.arbiter.quietUntil ? 1 : 0)
    },
  })
}
