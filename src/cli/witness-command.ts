/**
 * `duplex witness`: runs the witness daemon (third site) in the foreground until SIGTERM or
 * SIGINT. Prints one ready line on stdout once it serves:
 * `NAME witness HOST:PORT[ metrics http://HOST:PORT/metrics]`; logs go to stderr.
 */
import { formatEndpoint, parseEndpoint } from '../core/endpoints.js'
import { DuplexError } from '../core/errors.js'
import { credentialFiles, TlsCredentials } from '../core/tls.js'
import { createLogger } from '../core/log.js'
import { startWitness } from '../daemon/witness.js'
import { leaseTimingProblem, nodeLeaseDefaults } from '../witness/lease.js'
import { runUntilStopped } from './foreground.js'

export interface WitnessArgs {
  name: string
  dataDir: string
  listen: string
  metricsListen?: string | undefined
  leaseMs: number
  /** Cluster TLS: a directory with ca-cert.pem, cert.pem and key.pem (see src/core/tls.ts). */
  credentials?: string | undefined
}

export async function runWitnessCommand(args: WitnessArgs): Promise<number> {
  const log = createLogger(args.name)
  const listen = parseEndpoint(args.listen, '--listen')
  const metricsListen =
    args.metricsListen === undefined
      ? undefined
      : parseEndpoint(args.metricsListen, '--metrics-listen')
  const timing = { ...nodeLeaseDefaults, leaseMs: args.leaseMs }
  const problem = leaseTimingProblem(timing)
  if (problem !== undefined) throw new DuplexError('INVALID_ARGUMENT', `--lease-ms: ${problem}`)
  const tls =
    args.credentials === undefined
      ? undefined
      : new TlsCredentials({
          files: credentialFiles(args.credentials),
          self: { role: 'witness' },
          log: log.child('tls'),
        })
  if (tls === undefined)
    log.warn('cluster traffic is in the clear: give --credentials DIR for mutual TLS')
  const witness = await startWitness({
    ...(tls === undefined ? {} : { tls }),
    name: args.name,
    dataDir: args.dataDir,
    listen,
    ...(metricsListen === undefined ? {} : { metricsListen }),
    timing,
    log,
  })
  const endpoint = formatEndpoint(witness.address.address, witness.address.port)
  const metrics =
    witness.metricsAddress === undefined
      ? ''
      : ` metrics http://${formatEndpoint(witness.metricsAddress.address, witness.metricsAddress.port)}/metrics`
  process.stdout.write(`${args.name} witness ${endpoint}${metrics}\n`)
  log.info('serving', { witness: endpoint, dataDir: args.dataDir })
  return runUntilStopped(
    () => {
      tls?.close()
      return witness.stop()
    },
    log,
    () => tls?.reload(true),
  )
}
