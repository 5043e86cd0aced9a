/**
 * Client-visible I/O metrics of a node, per volume and NBD command: requests, data bytes,
 * failures, latency (a histogram, from dispatch to the reply being queued) and requests in
 * flight. The NBD server reports each request through `NbdRequestObserver`; the label children
 * are cached per (volume, command) so that a request costs two map lookups, not a label hash.
 */
import { Counter, Gauge, Histogram } from 'prom-client'
import type { Registry } from 'prom-client'
import type { NbdRequestObserver } from '../nbd/server.js'

/** Seconds: 50 µs to 10 s, dense where a synchronous write across sites lands (0.2-5 ms). */
export const latencyBuckets = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
  5, 10,
]

interface Children {
  requests: Counter.Internal
  bytes: Counter.Internal
  errors: Counter.Internal
  latency: Histogram.Internal<string>
}

export class IoMetrics implements NbdRequestObserver {
  private readonly requests: Counter
  private readonly bytes: Counter
  private readonly errors: Counter
  private readonly latency: Histogram
  private readonly inflight: Gauge
  private readonly children = new Map<string, Children>()
  private readonly inflightByVolume = new Map<string, number>()

  constructor(registry: Registry) {
    const labelNames = ['volume', 'op']
    const registers = [registry]
    this.requests = new Counter({
      name: 'duplex_volume_requests_total',
      help: 'NBD requests completed, by volume and command (read, write, flush, trim, zero, ...)',
      labelNames,
      registers,
    })
    this.bytes = new Counter({
      name: 'duplex_volume_data_bytes_total',
      help: 'Data bytes read or written by NBD clients, by volume and command',
      labelNames,
      registers,
    })
    this.errors = new Counter({
      name: 'duplex_volume_request_errors_total',
      help: 'NBD requests that failed (the client got an error), by volume and command',
      labelNames,
      registers,
    })
    this.latency = new Histogram({
      name: 'duplex_volume_request_duration_seconds',
      help: 'Time from receiving an NBD request to queueing its reply (as the client sees it)',
      labelNames,
      buckets: latencyBuckets,
      registers,
    })
    const inflightByVolume = this.inflightByVolume
    this.inflight = new Gauge({
      name: 'duplex_volume_requests_in_flight',
      help: 'NBD requests received and not yet answered, by volume',
      labelNames: ['volume'],
      registers,
      collect() {
        for (const [volume, count] of inflightByVolume) this.set({ volume }, count)
      },
    })
  }

  started(volume: string): void {
    this.inflightByVolume.set(volume, (this.inflightByVolume.get(volume) ?? 0) + 1)
  }

  finished(volume: string, kind: string, bytes: number, seconds: number, failed: boolean): void {
    this.inflightByVolume.set(volume, (this.inflightByVolume.get(volume) ?? 1) - 1)
    const key = `${volume}\0${kind}`
    let children = this.children.get(key)
    if (children === undefined) {
      const labels = { volume, op: kind }
      children = {
        requests: this.requests.labels(labels),
        bytes: this.bytes.labels(labels),
        errors: this.errors.labels(labels),
        latency: this.latency.labels(labels),
      }
      this.children.set(key, children)
    }
    children.requests.inc()
    if (bytes > 0) children.bytes.inc(bytes)
    if (failed) children.errors.inc()
    children.latency.observe(seconds)
  }

  /** A volume gone from this node: its series go too (bounded cardinality). */
  forget(volume: string): void {
    for (const key of [...this.children.keys()]) {
      if (!key.startsWith(`${volume}\0`)) continue
      this.children.delete(key)
      const op = key.slice(volume.length + 1)
      for (const metric of [this.requests, this.bytes, this.errors, this.latency]) {
        metric.remove({ volume, op })
      }
    }
    this.inflightByVolume.delete(volume)
    this.inflight.remove({ volume })
  }
}
