/**
 * `duplex node`: runs the storage daemon in the foreground until SIGTERM or SIGINT. Prints one
 * ready line on stdout once it serves (scripts and `duplex demo` wait for it); logs go to stderr.
 */
import { createLogger } from '../core/log.js'
import { DuplexError } from '../core/errors.js'
import { startNode } from '../daemon/node.js'
import { readClusterConfig } from '../daemon/cluster-config.js'
import { faultsFromEnvironment } from '../daemon/faults.js'
import { formatEndpoint, parseEndpoint } from '../core/endpoints.js'
import { PAYLOAD_BYTES_MAX } from '../nbd/protocol.js'
import { runUntilStopped } from './foreground.js'

export interface NodeArgs {
  name: string
  dataDir: string
  listen: string
  metricsListen?: string | undefined
  blockSizeMin: number
  cluster?: string | undefined
}

export async function runNodeCommand(args: NodeArgs): Promise<number> {
  if (![1, 512, 4096].includes(args.blockSizeMin)) {
    throw new DuplexError('INVALID_ARGUMENT', '--block-size-min must be 1, 512 or 4096')
  }
  const log = createLogger(args.name)
  const listen = parseEndpoint(args.listen, '--listen')
  const metricsListen =
    args.metricsListen === undefined
      ? undefined
      : parseEndpoint(args.metricsListen, '--metrics-listen')
  const cluster = args.cluster === undefined ? undefined : await readClusterConfig(args.cluster)
  const node = await startNode({
    name: args.name,
    ...(cluster === undefined ? {} : { cluster }),
    replication: { link: faultsFromEnvironment(process.env, log) },
    dataDir: args.dataDir,
    listen,
    ...(metricsListen === undefined ? {} : { metricsListen }),
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
  process.stdout.write(`${args.name} listening ${nbd}${metrics}${replication}\n`)
  log.info('serving', { nbd, dataDir: args.dataDir })

  return runUntilStopped(() => node.stop(), log)
}
