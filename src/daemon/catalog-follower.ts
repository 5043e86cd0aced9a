/**
 * A node that follows the witness's catalog (`duplex node --witness HOST:PORT`) instead of a
 * cluster file: it waits until an admin has added it (`duplex node add`), registers where
 * clients reach it and how much its data directory's file system holds, and from then on asks
 * the witness for every newer revision (a long poll) and hands each to the node as a checked
 * cluster config. A node that was down simply asks again when it starts: the catalog is the
 * state, not a stream of events, so nothing is missed.
 */
import { statfs } from 'node:fs/promises'
import type * as grpc from '@grpc/grpc-js'
import { DuplexError, errorMessage, isDuplexError } from '../core/errors.js'
import type { Logger } from '../core/log.js'
import { AdminClient } from '../witness/admin-service.js'
import { clusterJsonOf } from '../witness/catalog.js'
import type { Catalog } from '../witness/catalog.js'
import { parseClusterConfig } from './cluster-config.js'
import type { ClusterConfig } from './cluster-config.js'

export interface CatalogFollowerOptions {
  nodeName: string
  /** HOST:PORT of the witness's Admin service. */
  witness: string
  dataDir: string
  log: Logger
  /** How long one long poll waits for a newer revision. */
  pollMs?: number
  /** Pause after a failed call. */
  retryMs?: number
  /** Cluster TLS to the witness; plaintext if undefined. */
  credentials?: grpc.ChannelCredentials
}

export class CatalogFollower {
  private readonly admin: AdminClient
  private stopped = false
  private revision = 0
  private wake: (() => void) | undefined
  /** HOST:PORT hypervisors reach this node's NBD server at (set by `register`). */
  private nbd = ''

  constructor(private readonly options: CatalogFollowerOptions) {
    this.admin = new AdminClient(
      options.witness,
      options.credentials === undefined ? {} : { credentials: options.credentials },
    )
  }

  /** Waits until the catalog lists this node and returns its cluster (then: `register`). */
  async start(): Promise<ClusterConfig> {
    const { nodeName, log } = this.options
    let said = ''
    for (;;) {
      if (this.stopped) throw new DuplexError('SHUTTING_DOWN', 'stopped before joining')
      try {
        const catalog = await this.admin.getCatalog(this.revision, this.revision === 0 ? 0 : 10_000)
        this.revision = catalog.revision
        if (catalog.nodes.some((node) => node.name === nodeName)) return this.configOf(catalog)
        const why = `the catalog at ${this.options.witness} has no node ${nodeName} yet; an admin adds it: duplex node add ${nodeName} --domain DOMAIN --address HOST:PORT`
        if (said !== why) log.warn('waiting to be added', { why })
        said = why
      } catch (error) {
        const why = errorMessage(error)
        if (said !== why) log.warn('cannot reach the catalog; retrying', { error: why })
        said = why
        await this.pause()
      }
    }
  }

  /** Calls `apply` with each newer catalog until `stop`; its failures are logged and retried. */
  follow(apply: (config: ClusterConfig) => Promise<void>): void {
    const loop = async (): Promise<void> => {
      let failing = false
      while (!this.stopped) {
        try {
          const catalog = await this.admin.getCatalog(this.revision, this.options.pollMs ?? 30_000)
          if (this.isStopped()) return
          if (failing) this.options.log.info('catalog reachable again')
          failing = false
          if (catalog.revision === this.revision) continue
          if (!catalog.nodes.some((node) => node.name === this.options.nodeName)) {
            this.options.log.error('this node was removed from the catalog; it keeps running', {
              revision: catalog.revision,
            })
            this.revision = catalog.revision
            continue
          }
          await this.registerIn(catalog)
          await apply(this.configOf(catalog))
          this.revision = catalog.revision
        } catch (error) {
          if (this.isStopped()) return
          if (!failing) {
            this.options.log.warn('cannot follow the catalog; retrying', {
              error: errorMessage(error),
            })
          }
          failing = true
          await this.pause()
        }
      }
    }
    void loop()
  }

  /** A method, not the field: `stop` may run while a call is awaited. */
  private isStopped(): boolean {
    return this.stopped
  }

  stop(): void {
    this.stopped = true
    this.wake?.()
    this.admin.close()
  }

  private configOf(catalog: Catalog): ClusterConfig {
    return parseClusterConfig(
      clusterJsonOf(catalog, this.options.witness),
      `the catalog at ${this.options.witness} (revision ${catalog.revision})`,
    )
  }

  /** Tells the catalog where clients reach this node (HOST:PORT) and how much it holds. */
  async register(nbd: string): Promise<void> {
    this.nbd = nbd
    await this.registerIn(await this.admin.getCatalog())
  }

  /** Registers again if the catalog's entry for this node is out of date. */
  private async registerIn(catalog: Catalog): Promise<void> {
    const { nodeName, dataDir, log } = this.options
    const { nbd } = this
    if (nbd === '') return
    const stats = await statfs(dataDir)
    const capacityBytes = stats.bsize * stats.blocks
    const entry = catalog.nodes.find((node) => node.name === nodeName)
    if (entry?.nbd === nbd && entry.reportedCapacityBytes === capacityBytes) return
    try {
      await this.admin.change({ type: 'registerNode', name: nodeName, nbd, capacityBytes })
      log.info('registered with the catalog', { nbd, capacityBytes })
    } catch (error) {
      if (isDuplexError(error, 'NOT_FOUND')) return // removed meanwhile: the next poll says so
      throw error
    }
  }

  private pause(): Promise<void> {
    return new Promise((resolve) => {
      const timer = setTimeout(done, this.options.retryMs ?? 1000)
      function done(): void {
        clearTimeout(timer)
        resolve()
      }
      this.wake = done
    })
  }
}
