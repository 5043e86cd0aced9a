/**
 * Serves a prom-client registry at /metrics over HTTP, and the process metrics every daemon
 * exposes next to its own (docs/metrics.md).
 */
import http from 'node:http'
import type { AddressInfo } from 'node:net'
import { collectDefaultMetrics, Gauge } from 'prom-client'
import type { Registry } from 'prom-client'
import type { Logger } from '../core/log.js'
import type { TlsCredentials } from '../core/tls.js'
import { errorMessage } from '../core/errors.js'

export class MetricsServer {
  private readonly server: http.Server

  constructor(
    private readonly registry: Registry,
    private readonly log: Logger,
  ) {
    this.server = http.createServer((request, response) => {
      void this.serve(request, response)
    })
  }

  async listen(host: string, port: number): Promise<AddressInfo> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject)
      this.server.listen({ host, port }, () => {
        this.server.off('error', reject)
        resolve()
      })
    })
    return this.server.address() as AddressInfo
  }

  async close(): Promise<void> {
    this.server.closeAllConnections()
    await new Promise<void>((resolve) => {
      this.server.close(() => {
        resolve()
      })
    })
  }

  private async serve(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    if (request.method !== 'GET' || (request.url ?? '').split('?')[0] !== '/metrics') {
      response.writeHead(404, { 'content-type': 'text/plain' }).end('try /metrics\n')
      return
    }
    try {
      const body = await this.registry.metrics()
      response.writeHead(200, { 'content-type': this.registry.contentType }).end(body)
    } catch (error) {
      this.log.error('metrics collection failed', { error: errorMessage(error) })
      response.writeHead(500, { 'content-type': 'text/plain' }).end('metrics collection failed\n')
    }
  }
}

/**
 * prom-client's process and Node.js metrics, minus three gauges it names with a `_total` suffix
 * that Prometheus reserves for counters (`promtool check metrics` refuses them); the same values
 * stay available without the suffix (`nodejs_active_handles` and the like).
 */
export function registerProcessMetrics(registry: Registry): void {
  collectDefaultMetrics({ register: registry })
  for (const name of [
    'nodejs_active_handles_total',
    'nodejs_active_requests_total',
    'nodejs_active_resources_total',
  ]) {
    registry.removeSingleMetric(name)
  }
}

/** A TLS certificate a process uses, by what it secures ("cluster": gRPC, "nbd"). */
export interface CertificateInUse {
  purpose: 'cluster' | 'nbd'
  credentials: TlsCredentials
}

/**
 * `duplex_tls_certificate_expiry_timestamp_seconds{purpose}`: when each certificate in use
 * expires, read at scrape time (so a rotated certificate shows at once). Registered even
 * without TLS, with no series then.
 */
export function registerCertificateMetrics(
  registry: Registry,
  certificates: readonly CertificateInUse[],
): void {
  new Gauge({
    name: 'duplex_tls_certificate_expiry_timestamp_seconds',
    help: 'When the TLS certificate in use expires (Unix time), by what it secures: cluster (gRPC) or nbd',
    labelNames: ['purpose'],
    registers: [registry],
    collect() {
      for (const { purpose, credentials } of certificates) {
        this.set({ purpose }, credentials.current.validTo.getTime() / 1000)
      }
    },
  })
}
