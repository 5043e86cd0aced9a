/**
 * `duplex witness`: the third-site daemon's composition root. Loads its durable records and the
 * cluster catalog, runs the arbiter (src/witness/arbiter.ts) behind the Witness gRPC service and
 * the catalog (src/witness/catalog.ts) behind the Admin service, on one port, and exposes
 * /metrics.
 *
 * Every decision runs alone, in arrival order: decide on the current state with the current
 * monotonic time, make the change durable (synced RocksDB batch), apply it, answer. Two requests
 * can therefore never be granted against the same state. Catalog changes join the same queue,
 * so a volume deleted from the catalog and its witness record go away together. If the store fails, the witness grants
 * nothing more until it is restarted (it cannot know what is durable).
 */
import type { AddressInfo } from 'node:net'
import { performance } from 'node:perf_hooks'
import * as grpc from '@grpc/grpc-js'
import { Counter, Gauge, Registry } from 'prom-client'
import { DuplexError, errorMessage } from '../core/errors.js'
import { formatEpoch } from '../core/epochs.js'
import type { Logger } from '../core/log.js'
import type { TlsCredentials } from '../core/tls.js'
import {
  MetricsServer,
  registerCertificateMetrics,
  registerProcessMetrics,
} from '../metrics/http.js'
import { Arbiter } from '../witness/arbiter.js'
import type { Decision, VolumeRecord } from '../witness/arbiter.js'
import { nodeLeaseDefaults } from '../witness/lease.js'
import type { LeaseTiming } from '../witness/lease.js'
import { addWitnessService, witnessServerOptions } from '../witness/witness-service.js'
import type { HeartbeatAnswer, WitnessHandlers, WitnessStatus } from '../witness/witness-service.js'
import { WitnessStore } from '../witness/witness-store.js'
import { addAdminService } from '../witness/admin-service.js'
import type { AdminHandlers, ChangeAnswer, ClusterStatus } from '../witness/admin-service.js'
import { applyCatalogCommand } from '../witness/catalog.js'
import type { Catalog, CatalogCommand } from '../witness/catalog.js'

export interface WitnessOptions {
  name: string
  dataDir: string
  listen: { host: string; port: number }
  /** Cluster TLS: every caller needs a certificate from the CA (src/core/tls.ts). */
  tls?: TlsCredentials
  metricsListen?: { host: string; port: number }
  timing?: LeaseTiming
  log: Logger
}

export interface RunningWitness {
  address: AddressInfo
  metricsAddress: AddressInfo | undefined
  stop(): Promise<void>
}

type Kind = 'report' | 'degrade' | 'takeover' | 'handover' | 'replace'

/** The handlers: the arbiter and the catalog, one decision at a time, durable before it answers. */
class Witness implements WitnessHandlers, AdminHandlers {
  private tail: Promise<unknown> = Promise.resolve()
  private storeFailure: string | undefined
  readonly grants = new Map<Kind, number>()
  readonly refusals = new Map<string, number>()
  readonly catalogChanges = new Map<string, number>()
  /** GetCatalog calls waiting for a newer revision. */
  private readonly waiters = new Set<() => void>()

  constructor(
    readonly arbiter: Arbiter,
    public catalog: Catalog,
    private readonly store: WitnessStore,
    private readonly log: Logger,
  ) {}

  change(command: CatalogCommand): Promise<ChangeAnswer> {
    const result = this.tail.then(async () => {
      this.checkStore()
      const now = performance.now()
      const up = new Set(
        this.arbiter
          .leases(now)
          .filter((lease) => lease.remainingMs > 0)
          .map((lease) => lease.node),
      )
      const down = new Set(this.catalog.nodes.map((node) => node.name).filter((n) => !up.has(n)))
      const decision = applyCatalogCommand(this.catalog, command, { down })
      if (!decision.ok) {
        const key = `catalog ${decision.code}`
        this.refusals.set(key, (this.refusals.get(key) ?? 0) + 1)
        throw new DuplexError(decision.code, decision.message)
      }
      if (!decision.changed) return { catalog: this.catalog, changed: false }
      const next = decision.catalog
      const forget = this.catalog.volumes
        .filter((volume) => !next.volumes.some((kept) => kept.name === volume.name))
        .map((volume) => volume.name)
      try {
        await this.store.putCatalog(next, forget)
      } catch (error) {
        this.storeFailed(error)
        throw new DuplexError('IO_ERROR', `the witness cannot record the catalog change`)
      }
      this.catalog = next
      for (const volume of forget) this.arbiter.forget(volume)
      this.catalogChanges.set(command.type, (this.catalogChanges.get(command.type) ?? 0) + 1)
      this.log.info('catalog changed', {
        revision: next.revision,
        change: command.type,
        name: command.name,
      })
      for (const wake of this.waiters) wake()
      return { catalog: next, changed: true }
    })
    this.tail = result.catch(() => undefined)
    return result
  }

  getCatalog(afterRevision: number, waitMs: number): Promise<Catalog> {
    if (this.catalog.revision > afterRevision || waitMs === 0) {
      return Promise.resolve(this.catalog)
    }
    return new Promise((resolve) => {
      const done = (): void => {
        clearTimeout(timer)
        this.waiters.delete(done)
        resolve(this.catalog)
      }
      const timer = setTimeout(done, waitMs)
      this.waiters.add(done)
    })
  }

  clusterStatus(): Promise<ClusterStatus> {
    const now = performance.now()
    return Promise.resolve({
      catalog: this.catalog,
      volumes: this.arbiter.allRecords().map((record) => ({
        volume: record.volume,
        epoch: record.epoch,
        owner: record.owner,
        inSync: record.inSync,
      })),
      leases: this.arbiter
        .leases(now)
        .map((lease) => ({ node: lease.node, remainingMs: Math.ceil(lease.remainingMs) })),
      quietMs: Math.max(0, Math.ceil(this.arbiter.quietUntil - now)),
    })
  }

  /** Wakes every waiting GetCatalog (a stopping witness answers them). */
  wakeAll(): void {
    for (const wake of this.waiters) wake()
  }

  private checkStore(): void {
    if (this.storeFailure !== undefined) {
      throw new DuplexError('IO_ERROR', `the witness's store failed: ${this.storeFailure}`)
    }
  }

  private storeFailed(error: unknown): void {
    this.storeFailure = errorMessage(error)
    this.log.error('cannot make a decision durable; granting nothing more', {
      error: this.storeFailure,
    })
  }

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

  /**
   * A moved replica: the arbiter's record and the catalog change together, in one synced batch.
   * The catalog must be moving that replica to that node (an admin asked for it), or nothing
   * changes.
   */
  replaceReplica(request: Parameters<WitnessHandlers['replaceReplica']>[0]): Promise<VolumeRecord> {
    const { volume, fromNode, toNode } = request
    return this.decide(
      'replace',
      (now) => this.arbiter.replace(request, now),
      () => {
        const result = applyCatalogCommand(
          this.catalog,
          { type: 'completeMove', name: volume, fromNode, toNode },
          { down: new Set() },
        )
        if (!result.ok) throw new DuplexError(result.code, result.message)
        return result.catalog
      },
    )
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

  private decide(
    kind: Kind,
    decide: (now: number) => Decision,
    /** The catalog that changes with the record (it may refuse by throwing). */
    catalogWith?: () => Catalog,
  ): Promise<VolumeRecord> {
    const result = this.tail.then(async () => {
      this.checkStore()
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
        const catalog = catalogWith?.()
        try {
          if (catalog === undefined) await this.store.put(change)
          else await this.store.putRecordAndCatalog(change, catalog)
        } catch (error) {
          this.storeFailed(error)
          throw new DuplexError('IO_ERROR', `the witness cannot record ${change.volume}`)
        }
        this.arbiter.apply(change)
        if (catalog !== undefined && catalog !== this.catalog) {
          this.catalog = catalog
          this.catalogChanges.set(
            'completeMove',
            (this.catalogChanges.get('completeMove') ?? 0) + 1,
          )
          this.log.info('catalog changed', { revision: catalog.revision, change: 'completeMove' })
          for (const wake of this.waiters) wake()
        }
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
  let catalog: Catalog
  try {
    records = await store.load()
    catalog = await store.loadCatalog()
  } catch (error) {
    await store.close()
    throw error
  }
  const arbiter = new Arbiter(timing, records, performance.now())
  const witness = new Witness(arbiter, catalog, store, log)
  log.info('loaded', {
    volumes: records.length,
    catalogRevision: catalog.revision,
    grantsPausedMs: Math.round(arbiter.quietUntil - performance.now()),
  })

  const server = new grpc.Server(witnessServerOptions)
  const secure = options.tls !== undefined
  addWitnessService(server, witness, log.child('rpc'), secure)
  addAdminService(server, witness, log.child('admin'), secure)
  const credentials = options.tls?.serverCredentials() ?? grpc.ServerCredentials.createInsecure()
  const registry = new Registry()
  registry.setDefaultLabels({ witness: options.name })
  registerProcessMetrics(registry)
  registerCertificateMetrics(
    registry,
    options.tls === undefined ? [] : [{ purpose: 'cluster', credentials: options.tls }],
  )
  registerWitnessMetrics(registry, witness)
  const metrics = new MetricsServer(registry, log.child('metrics'))

  let address: AddressInfo
  let metricsAddress: AddressInfo | undefined
  try {
    const { host, port } = options.listen
    const bound = await new Promise<number>((resolve, reject) => {
      server.bindAsync(`${host}:${port}`, credentials, (error, p) => {
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
      witness.wakeAll()
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
      for (const kind of ['report', 'degrade', 'takeover', 'handover', 'replace'] as const) {
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
  new Counter({
    name: 'duplex_catalog_changes_total',
    help: 'Catalog changes the witness made durable, by kind (addNode, createVolume, ...)',
    labelNames: ['change'],
    registers: [registry],
    collect() {
      this.reset()
      for (const [change, count] of witness.catalogChanges) this.inc({ change }, count)
    },
  })
  new Gauge({
    name: 'duplex_catalog_entries',
    help: 'Entries in the cluster catalog, by kind (domains, nodes, volumes)',
    labelNames: ['kind'],
    registers: [registry],
    collect() {
      this.set({ kind: 'domains' }, witness.catalog.domains.length)
      this.set({ kind: 'nodes' }, witness.catalog.nodes.length)
      this.set({ kind: 'volumes' }, witness.catalog.volumes.length)
    },
  })
  new Gauge({
    name: 'duplex_catalog_revision',
    help: 'The catalog revision (counts changes since the cluster was created)',
    registers: [registry],
    collect() {
      this.set(witness.catalog.revision)
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
