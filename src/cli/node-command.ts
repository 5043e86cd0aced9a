/**
 * `duplex node`: runs the storage daemon in the foreground until SIGTERM or SIGINT. Prints one
 * ready line on stdout once it serves (scripts and `duplex demo` wait for it); logs go to stderr.
 *
 * What it replicates comes from the witness's catalog (`--witness HOST:PORT`: it waits until an
 * admin adds it, then follows every change) or from a static cluster file (`--cluster FILE`);
 * with neither it serves its local volumes unreplicated.
 */
import { createLogger } from '../core/log.js'
import type { Logger } from '../core/log.js'
import { DuplexError } from '../core/errors.js'
import { credentialFiles, TlsCredentials } from '../core/tls.js'
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
  /** Cluster TLS: a directory with ca-cert.pem, cert.pem and key.pem (see src/core/tls.ts). */
  credentials?: string | undefined
}

/**
 * NBD over TLS from the command line: the files are read and checked now (clear errors), and
 * re-read when they change (see TlsCredentials), so a rotated certificate needs no restart.
 */
function nbdTls(
  args: NodeArgs,
  log: Logger,
): { options: NbdTlsOptions; credentials: TlsCredentials } | undefined {
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
  const credentials = new TlsCredentials({
    files: { cert: tlsCert, key: tlsKey, ca: tlsCa },
    log: log.child('nbd-tls'),
  })
  return {
    options: {
      secureContext: () => credentials.secureContext(),
      required: tlsRequired === true,
      verifyClients: tlsCa !== undefined,
    },
    credentials,
  }
}

/**
 * Cluster TLS (`--credentials DIR`): mutual TLS on every gRPC connection, with this node's
 * duplex-node certificate, which must name the node.
 */
function clusterTls(args: NodeArgs, log: Logger): TlsCredentials | undefined {
  if (args.credentials === undefined) return undefined
  if (args.witness === undefined && args.cluster === undefined) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      '--credentials secures the cluster traffic: give --witness or --cluster too',
    )
  }
  return new TlsCredentials({
    files: credentialFiles(args.credentials),
    self: { role: 'node', name: args.name },
    log: log.child('tls'),
  })
}

export async function runNodeCommand(args: NodeArgs): Promise<number> {
  if (![1, 512, 4096].includes(args.blockSizeMin)) {
    throw new DuplexError('INVALID_ARGUMENT', '--block-size-min must be 1, 512 or 4096')
  }
  const log = createLogger(args.name)
  const listen = parseEndpoint(args.listen, '--listen')
  const nbdTlsSetup = nbdTls(args, log)
  const tls = clusterTls(args, log)
  if (tls === undefined && (args.witness !== undefined || args.cluster !== undefined)) {
    log.warn('cluster traffic is in the clear: give --credentials DIR for mutual TLS')
  }
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
          ...(tls === undefined
            ? {}
            : { credentials: tls.channelCredentials({ role: 'witness' }) }),
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
    ...(nbdTlsSetup === undefined
      ? {}
      : { tls: nbdTlsSetup.options, nbdCertificate: nbdTlsSetup.credentials }),
    ...(tls === undefined ? {} : { clusterTls: tls }),
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

  return runUntilStopped(
    () => {
      follower?.stop()
      tls?.close()
      nbdTlsSetup?.credentials.close()
      return node.stop()
    },
    log,
    () => {
      tls?.reload(true)
      nbdTlsSetup?.credentials.reload(true)
    },
  )
}
