/**
 * `duplex node`: runs the storage daemon in the foreground until SIGTERM or SIGINT. Prints one
 * ready line on stdout once it serves (scripts and `duplex demo` wait for it); logs go to stderr.
 *
 * What it replicates comes from the witness's catalog (`--witness HOST:PORT`: it waits until an
 * admin adds it, then follows every change) or from a static cluster file (`--cluster FILE`);
 * with neither it serves its local volumes unreplicated.
 */
import { createLogger } from '../core/log.js'
import { readFileSync } from 'node:fs'
import tls from 'node:tls'
import { DuplexError, errorMessage } from '../core/errors.js'
import { startNode } from '../daemon/node.js'
import { parseReachableEndpoint, readClusterConfig } from '../daemon/cluster-config.js'
import { CatalogFollower } from '../daemon/catalog-follower.js'
import { faultsFromEnvironment } from '../daemon/faults.js'
import { formatEndpoint, parseEndpoint } from '../core/endpoints.js'
import { PAYLOAD_BYTES_MAX } from '../nbd/protocol.js'
import type { NbdTlsOptions } from '../nbd/server.js'
import { runUntilStopped } from './foreground.js'

export interface NodeArgs {
  name: string
  dataDir: string
  listen: string
  metricsListen?: string | undefined
  blockSizeMin: number
  cluster?: string | undefined
  witness?: string | undefined
  /** HOST:PORT clients reach the NBD server at, if not --listen (e.g. it listens on 0.0.0.0). */
  advertise?: string | undefined
  /** NBD over TLS: certificate and key files (PEM), the clients' CA, and whether TLS is a must. */
  tlsCert?: string | undefined
  tlsKey?: string | undefined
  tlsCa?: string | undefined
  tlsRequired?: boolean | undefined
}

/** The NBD TLS settings from the command line, files read and checked (clear errors). */
function nbdTls(args: NodeArgs): NbdTlsOptions | undefined {
  const { tlsCert, tlsKey, tlsCa, tlsRequired } = args
  if (tlsCert === undefined && tlsKey === undefined) {
    if (tlsCa !== undefined || tlsRequired === true) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        '--tls-ca and --tls-required need --tls-cert and --tls-key',
      )
    }
    return undefined
  }
  if (tlsCert === undefined || tlsKey === undefined) {
    throw new DuplexError('INVALID_ARGUMENT', 'NBD over TLS needs both --tls-cert and --tls-key')
  }
  const read = (file: string, what: string): Buffer => {
    try {
      return readFileSync(file)
    } catch (error) {
      throw new DuplexError(
        'INVALID_ARGUMENT',
        `cannot read the ${what} ${file}: ${errorMessage(error)}`,
      )
    }
  }
  const cert = read(tlsCert, 'TLS certificate')
  const key = read(tlsKey, 'TLS key')
  const ca = tlsCa === undefined ? undefined : read(tlsCa, 'TLS CA')
  let context: tls.SecureContext
  try {
    context = tls.createSecureContext({ cert, key, ...(ca === undefined ? {} : { ca }) })
  } catch (error) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `the TLS certificate, key or CA cannot be used: ${errorMessage(error)}`,
    )
  }
  return { context, required: tlsRequired === true, verifyClients: ca !== undefined }
}

export async function runNodeCommand(args: NodeArgs): Promise<number> {
  if (![1, 512, 4096].includes(args.blockSizeMin)) {
    throw new DuplexError('INVALID_ARGUMENT', '--block-size-min must be 1, 512 or 4096')
  }
  const log = createLogger(args.name)
  const listen = parseEndpoint(args.listen, '--listen')
  const tlsOptions = nbdTls(args)
  const metricsListen =
    args.metricsListen === undefined
      ? undefined
      : parseEndpoint(args.metricsListen, '--metrics-listen')
  if (args.cluster !== undefined && args.witness !== undefined) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      'give --witness (follow the catalog) or --cluster (a static file), not both',
    )
  }
  if (args.witness !== undefined) parseEndpoint(args.witness, '--witness')
  const follower =
    args.witness === undefined
      ? undefined
      : new CatalogFollower({
          nodeName: args.name,
          witness: args.witness,
          dataDir: args.dataDir,
          log,
        })
  const cluster =
    args.cluster !== undefined ? await readClusterConfig(args.cluster) : await follower?.start()
  const node = await startNode({
    name: args.name,
    ...(cluster === undefined ? {} : { cluster }),
    replication: { link: faultsFromEnvironment(process.env, log) },
    dataDir: args.dataDir,
    listen,
    ...(metricsListen === undefined ? {} : { metricsListen }),
    ...(tlsOptions === undefined ? {} : { tls: tlsOptions }),
    blockSizes: {
      minBytes: args.blockSizeMin,
      preferredBytes: Math.max(4096, args.blockSizeMin),
      maxBytes: PAYLOAD_BYTES_MAX,
    },
    log,
  })
  const nbd = `nbd://${formatEndpoint(node.nbdAddress.address, node.nbdAddress.port)}`
  const metrics =
    node.metricsAddress === undefined
      ? ''
      : ` metrics http://${formatEndpoint(node.metricsAddress.address, node.metricsAddress.port)}/metrics`
  const replication =
    node.replicationAddress === undefined
      ? ''
      : ` replication ${formatEndpoint(node.replicationAddress.address, node.replicationAddress.port)}`
  if (follower !== undefined) {
    const advertised =
      args.advertise ?? formatEndpoint(node.nbdAddress.address, node.nbdAddress.port)
    try {
      parseReachableEndpoint(advertised, args.advertise === undefined ? '--listen' : '--advertise')
      await follower.register(advertised)
    } catch (error) {
      follower.stop()
      await node.stop()
      throw error
    }
    const { replication: running } = node
    follower.follow((config) => running?.reconcile(config) ?? Promise.resolve())
  }
  process.stdout.write(`${args.name} listening ${nbd}${metrics}${replication}\n`)
  log.info('serving', { nbd, dataDir: args.dataDir })

  return runUntilStopped(() => {
    follower?.stop()
    return node.stop()
  }, log)
}
