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

  return new Promise((resolve) => {
    let stopping = false
    const finish = (code: number): void => {
      // An IPC channel from a supervisor keeps the event loop alive: let go of it.
      if (process.connected) process.disconnect()
      resolve(code)
    }
    const stop = (why: string): void => {
      stopping = true
      log.info('stopping', { why })
      node.stop().then(
        () => {
          finish(0)
        },
        (error: unknown) => {
          log.error('unclean stop', { error: String(error) })
          finish(1)
        },
      )
    }
    const onSignal = (signal: NodeJS.Signals): void => {
      if (!stopping) {
        stop(signal)
        return
      }
      log.warn('second signal: exiting without waiting for in-flight requests', { signal })
      process.exit(1)
    }
    process.on('SIGTERM', onSignal)
    process.on('SIGINT', onSignal)
    // Started by a supervisor with an IPC channel (duplex demo): stop when it goes away.
    process.on('disconnect', () => {
      if (!stopping) stop('supervisor gone')
    })
  })
}
