#!/usr/bin/env node
/**
 * The `duplex` executable: argument parsing and wiring only. Each command lives in its own
 * module; errors become a sentence on stderr and an exit code here (see output.ts).
 */
// The libuv pool runs every file read, write and fdatasync. Its default of 4 threads caps a
// node at 4 concurrent disk operations; set before the first file operation creates the pool.
process.env.UV_THREADPOOL_SIZE ??= '16'

import yargs from 'yargs'
import { hideBin } from 'yargs/helpers'
import { runNodeCommand } from './node-command.js'
import { runWitnessCommand } from './witness-command.js'
import { createVolume, deleteVolume, listVolumes } from './volume-command.js'
import { runDemo } from './demo.js'
import {
  promoteVolume,
  replicationStatus,
  resolveVolume,
  verifyVolume,
} from './replication-command.js'
import { ExitCode, reportError } from './output.js'
import { DuplexError } from '../core/errors.js'
import { nodeLeaseDefaults } from '../witness/lease.js'

async function main(argv: string[]): Promise<number> {
  let result: Promise<number> = Promise.resolve(ExitCode.OK)
  const run = (work: () => Promise<number | undefined>): void => {
    result = work().then((code) => code ?? ExitCode.OK)
  }
  await yargs(argv)
    .scriptName('duplex')
    .usage('$0 <command>\n\nSynchronous two-replica block storage served over NBD.')
    .command(
      'node',
      'run a storage node daemon in the foreground',
      (y) =>
        y
          .option('data-dir', {
            type: 'string',
            demandOption: true,
            describe: 'node state directory',
          })
          .option('listen', {
            type: 'string',
            default: '127.0.0.1:10809',
            describe: 'NBD HOST:PORT',
          })
          .option('metrics-listen', { type: 'string', describe: 'HOST:PORT for /metrics' })
          .option('name', {
            type: 'string',
            default: 'node',
            describe: 'node name in logs and metrics',
          })
          .option('block-size-min', {
            type: 'number',
            default: 1,
            describe: 'minimum block size advertised to clients (1, 512 or 4096)',
          })
          .option('cluster', {
            type: 'string',
            describe: 'cluster file: replicate the volumes it places on this node (--name)',
          }),
      (a) => {
        run(() =>
          runNodeCommand({
            name: a.name,
            dataDir: a['data-dir'],
            listen: a.listen,
            metricsListen: a['metrics-listen'],
            blockSizeMin: a['block-size-min'],
            cluster: a.cluster,
          }),
        )
      },
    )
    .command(
      'witness',
      'run the witness daemon (third site) in the foreground',
      (y) =>
        y
          .option('data-dir', {
            type: 'string',
            demandOption: true,
            describe: 'witness state directory',
          })
          .option('listen', {
            type: 'string',
            default: '127.0.0.1:10900',
            describe: 'gRPC HOST:PORT for nodes and admins',
          })
          .option('metrics-listen', { type: 'string', describe: 'HOST:PORT for /metrics' })
          .option('name', {
            type: 'string',
            default: 'witness',
            describe: 'name in logs and metrics',
          })
          .option('lease-ms', {
            type: 'number',
            default: nodeLeaseDefaults.leaseMs,
            describe: 'node lease length; nodes learn it from the witness',
          }),
      (a) => {
        run(() =>
          runWitnessCommand({
            name: a.name,
            dataDir: a['data-dir'],
            listen: a.listen,
            metricsListen: a['metrics-listen'],
            leaseMs: a['lease-ms'],
          }),
        )
      },
    )
    .command('volume', 'manage volumes: on a node, or replicated across the cluster', (y) =>
      y
        .option('data-dir', {
          type: 'string',
          describe: 'the node state directory (create, delete, list)',
        })
        .option('cluster', {
          type: 'string',
          default: process.env.DUPLEX_CLUSTER ?? '.duplex-demo/cluster.json',
          describe: 'cluster file (promote, resolve, status, verify); env DUPLEX_CLUSTER',
        })
        .command(
          'promote <name>',
          'move the primary role of a replicated volume to a node, without stopping I/O',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('node', { type: 'string', demandOption: true, describe: 'the new primary' })
              .option('force', {
                type: 'boolean',
                default: false,
                describe: "run alone without the peer and the witness (the peer's site is gone)",
              })
              .option('yes', {
                type: 'boolean',
                default: false,
                describe: 'confirm --force after reading the warning',
              }),
          (a) => {
            run(() =>
              promoteVolume(a.cluster, a.name, a.node, { force: a.force, yes: a.yes }).then(
                () => undefined,
              ),
            )
          },
        )
        .command(
          'resolve <name>',
          'after a split brain: keep one replica, discard and refill the other',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('keep', {
                type: 'string',
                demandOption: true,
                describe: 'the node whose replica survives',
              })
              .option('yes', { type: 'boolean', default: false, describe: 'confirm' }),
          (a) => {
            run(() => resolveVolume(a.cluster, a.name, a.keep, a.yes).then(() => undefined))
          },
        )
        .command(
          'status',
          'every replica of every volume in the cluster file: role, epoch, state',
          (c) =>
            c.option('output', { choices: ['table', 'json'] as const, default: 'table' as const }),
          (a) => {
            run(() => replicationStatus(a.cluster, a.output).then(() => undefined))
          },
        )
        .command(
          'verify <name>',
          'compare the two replicas of a volume chunk by chunk (xxh64), online',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('repair', {
                type: 'boolean',
                default: false,
                describe: 'copy chunks that differ from the primary to the secondary',
              })
              .option('output', { choices: ['table', 'json'] as const, default: 'table' as const }),
          (a) => {
            run(() => verifyVolume(a.cluster, a.name, { repair: a.repair, output: a.output }))
          },
        )
        .command(
          'create <name>',
          'create a volume',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('size', { type: 'string', demandOption: true, describe: 'e.g. 50G, 512M' }),
          (a) => {
            run(() => createVolume(dataDir(a), a.name, a.size).then(() => undefined))
          },
        )
        .command(
          'delete <name>',
          'delete a volume and its data',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('yes', { type: 'boolean', default: false, describe: 'confirm deletion' }),
          (a) => {
            run(() => deleteVolume(dataDir(a), a.name, a.yes).then(() => undefined))
          },
        )
        .command(
          'list',
          'list volumes',
          (c) =>
            c.option('output', { choices: ['table', 'json'] as const, default: 'table' as const }),
          (a) => {
            run(() => listVolumes(dataDir(a), a.output).then(() => undefined))
          },
        )
        .demandCommand(
          1,
          'name a volume command: create, delete, list, promote, resolve, status or verify',
        ),
    )
    .command(
      'demo',
      'run a local demo cluster on 127.0.0.1 (what `npm start` runs)',
      (y) =>
        y
          .option('dir', { type: 'string', default: '.duplex-demo', describe: 'state directory' })
          .option('port', { type: 'number', default: 10809, describe: 'first port to use' }),
      (a) => {
        run(() => runDemo({ dir: a.dir, port: a.port }))
      },
    )
    .demandCommand(1, 'name a command (try --help)')
    .strict()
    .completion('completion', 'print a shell completion script')
    .fail((message: string | undefined, error: Error | undefined) => {
      // yargs passes the handler's own error here too; only usage mistakes are ours to report.
      if (error !== undefined) throw error
      process.stderr.write(`duplex: ${message}\nRun 'duplex --help' for usage.\n`)
      process.exit(ExitCode.USAGE)
    })
    .help()
    .parseAsync()
  return result
}

/** --data-dir, which the node-local volume commands need. */
function dataDir(args: { 'data-dir'?: string | undefined }): string {
  const dir = args['data-dir']
  if (dir === undefined) {
    throw new DuplexError('INVALID_ARGUMENT', 'this volume command needs --data-dir DIR')
  }
  return dir
}

main(hideBin(process.argv)).then(
  (code) => {
    process.exitCode = code
  },
  (error: unknown) => {
    process.exitCode = reportError(error)
  },
)
