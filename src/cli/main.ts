#!/usr/bin/env node
/**
 * The `duplex` executable: argument parsing and wiring only. Each command lives in its own
 * module; errors become a sentence on stderr and an exit code here (see output.ts).
 */
// The libuv pool runs every file read, write and fdatasync. Its default of 4 threads caps a
// node at 4 concurrent disk operations; set before the first file operation creates the pool.
process.env.UV_THREADPOOL_SIZE ??= '16'

import yargs from 'yargs'
import type { Argv } from 'yargs'
import { hideBin } from 'yargs/helpers'
import { runNodeCommand } from './node-command.js'
import { runWitnessCommand } from './witness-command.js'
import { createVolume, deleteVolume, listVolumes } from './volume-command.js'
import {
  addDomain,
  addNode,
  clusterStatus,
  createCatalogVolume,
  defaultWitness,
  deleteCatalogVolume,
  drainNode,
  listCatalogVolumes,
  listDomains,
  listNodes,
  moveCatalogVolume,
  removeDomain,
  removeNode,
  resizeCatalogVolume,
  setVolumeAccess,
  showCatalogVolume,
  showNode,
} from './catalog-command.js'
import type { ClusterSource } from './catalog-command.js'
import { runDemo } from './demo.js'
import { certKinds, issueCert, makeCa } from './cert-command.js'
import { nodeConfigOptions, readDaemonConfig, witnessConfigOptions } from './daemon-config.js'
import {
  promoteVolume,
  replicationStatus,
  resolveVolume,
  verifyVolume,
} from './replication-command.js'
import { ExitCode, reportError } from './output.js'
import { useCredentials } from './credentials.js'
import { nodeLeaseDefaults } from '../witness/lease.js'

async function main(argv: string[]): Promise<number> {
  let result: Promise<number> = Promise.resolve(ExitCode.OK)
  // A command resolves to its exit code, or to nothing (success).
  const run = (work: () => Promise<unknown>): void => {
    result = work().then((code) => (typeof code === 'number' ? code : ExitCode.OK))
  }
  await yargs(argv)
    .scriptName('duplex')
    .usage('$0 <command>\n\nSynchronous two-replica block storage served over NBD.')
    .command('node', 'run a storage node, or manage the nodes in the catalog', (y) =>
      y
        .command(
          ['run', '$0'],
          'run a storage node daemon in the foreground (the default)',
          (c) =>
            c
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
              .option('advertise', {
                type: 'string',
                describe: 'NBD HOST:PORT clients use, if not --listen (with --witness)',
              })
              .option('metrics-listen', { type: 'string', describe: 'HOST:PORT for /metrics' })
              .option('name', {
                type: 'string',
                default: 'node',
                describe: 'node name in the catalog, logs and metrics',
              })
              .option('block-size-min', {
                type: 'number',
                default: 1,
                describe: 'minimum block size advertised to clients (1, 512 or 4096)',
              })
              .option('tls-cert', {
                type: 'string',
                describe: "NBD over TLS: this node's certificate (PEM); with --tls-key",
              })
              .option('tls-key', {
                type: 'string',
                describe: 'NBD over TLS: its private key (PEM)',
              })
              .option('tls-ca', {
                type: 'string',
                describe: 'NBD over TLS: clients must present a certificate signed by this CA',
              })
              .option('tls-required', {
                type: 'boolean',
                default: false,
                describe: 'refuse NBD clients that do not start TLS (NBD_REP_ERR_TLS_REQD)',
              })
              .option('witness', {
                type: 'string',
                describe:
                  'follow the catalog at this witness (HOST:PORT): it says what to replicate',
              })
              .option('credentials', {
                type: 'string',
                describe:
                  'cluster TLS: a directory with ca-cert.pem, cert.pem, key.pem (duplex cert issue NAME --kind node)',
              })
              .option('cluster', {
                type: 'string',
                describe: 'or a static cluster file: replicate the volumes it places on this node',
              })
              .config('config', 'a JSON file of these options (the command line wins)', (file) =>
                readDaemonConfig(file, nodeConfigOptions),
              ),
          (a) => {
            run(() =>
              runNodeCommand({
                name: a.name,
                dataDir: a['data-dir'],
                listen: a.listen,
                advertise: a.advertise,
                metricsListen: a['metrics-listen'],
                blockSizeMin: a['block-size-min'],
                cluster: a.cluster,
                witness: a.witness,
                tlsCert: a['tls-cert'],
                tlsKey: a['tls-key'],
                tlsCa: a['tls-ca'],
                tlsRequired: a['tls-required'],
                credentials: a.credentials,
              }),
            )
          },
        )
        .command(
          'add <name>',
          'add a storage node to the catalog (then start it with --witness)',
          (c) =>
            witnessOption(c)
              .positional('name', { type: 'string', demandOption: true })
              .option('domain', {
                type: 'string',
                demandOption: true,
                describe: 'its data domain (site)',
              })
              .option('address', {
                type: 'string',
                demandOption: true,
                describe: 'HOST:PORT its peers replicate to',
              })
              .option('capacity', {
                type: 'string',
                describe:
                  'bytes it may hold, like 2T (default: its file system size, reported by the node)',
              }),
          (a) => {
            run(() =>
              addNode(a.witness, a.name, {
                domain: a.domain,
                address: a.address,
                capacity: a.capacity,
              }),
            )
          },
        )
        .command(
          'list',
          'list the nodes: domain, up or down, addresses, space',
          (c) => outputOption(witnessOption(c)),
          (a) => {
            run(() => listNodes(a.witness, a.output))
          },
        )
        .command(
          'show <name>',
          'one node in detail',
          (c) =>
            outputOption(witnessOption(c)).positional('name', {
              type: 'string',
              demandOption: true,
            }),
          (a) => {
            run(() => showNode(a.witness, a.name, a.output))
          },
        )
        .command(
          'drain <name>',
          'move every replica off a node, within its site, while the volumes keep serving',
          (c) =>
            witnessOption(c)
              .positional('name', { type: 'string', demandOption: true })
              .option('wait', {
                type: 'boolean',
                default: false,
                describe: 'wait until the node holds no replicas, showing progress',
              }),
          (a) => {
            run(() => drainNode(a.witness, a.name, a.wait))
          },
        )
        .command(
          'remove <name>',
          'remove a node that holds no replicas from the catalog',
          (c) =>
            witnessOption(c)
              .positional('name', { type: 'string', demandOption: true })
              .option('yes', { type: 'boolean', default: false, describe: 'confirm' }),
          (a) => {
            run(() => removeNode(a.witness, a.name, a.yes))
          },
        ),
    )
    .command('domain', 'manage fault domains (sites) in the catalog', (y) =>
      y
        .command(
          'add <name>',
          'add a domain: a data site, or the witness site',
          (c) =>
            witnessOption(c)
              .positional('name', { type: 'string', demandOption: true })
              .option('kind', {
                choices: ['data', 'witness'] as const,
                default: 'data' as const,
                describe: 'data: holds replicas; witness: the third site',
              }),
          (a) => {
            run(() => addDomain(a.witness, a.name, a.kind))
          },
        )
        .command(
          'list',
          'list the domains and their nodes',
          (c) => outputOption(witnessOption(c)),
          (a) => {
            run(() => listDomains(a.witness, a.output))
          },
        )
        .command(
          'remove <name>',
          'remove a domain without nodes',
          (c) => witnessOption(c).positional('name', { type: 'string', demandOption: true }),
          (a) => {
            run(() => removeDomain(a.witness, a.name))
          },
        )
        .demandCommand(1, 'name a domain command: add, list or remove'),
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
            default: defaultWitness,
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
          })
          .option('credentials', {
            type: 'string',
            describe:
              'cluster TLS: a directory with ca-cert.pem, cert.pem, key.pem (duplex cert issue NAME --kind witness)',
          })
          .config('config', 'a JSON file of these options (the command line wins)', (file) =>
            readDaemonConfig(file, witnessConfigOptions),
          ),
      (a) => {
        run(() =>
          runWitnessCommand({
            name: a.name,
            dataDir: a['data-dir'],
            listen: a.listen,
            metricsListen: a['metrics-listen'],
            leaseMs: a['lease-ms'],
            credentials: a.credentials,
          }),
        )
      },
    )
    .command('volume', 'manage volumes: in the cluster catalog, or on one node (--data-dir)', (y) =>
      witnessOption(y)
        .option('data-dir', {
          type: 'string',
          describe: "one node's state directory, offline or local (create, delete, list)",
        })
        .option('cluster', {
          type: 'string',
          default: process.env.DUPLEX_CLUSTER,
          describe:
            'a static cluster file instead of the catalog (promote, resolve, status, verify); env DUPLEX_CLUSTER',
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
            run(() => promoteVolume(source(a), a.name, a.node, { force: a.force, yes: a.yes }))
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
            run(() => resolveVolume(source(a), a.name, a.keep, a.yes).then(() => undefined))
          },
        )
        .command(
          'status',
          'every replica of every volume in the cluster file: role, epoch, state',
          (c) =>
            c.option('output', { choices: ['table', 'json'] as const, default: 'table' as const }),
          (a) => {
            run(() => replicationStatus(source(a), a.output).then(() => undefined))
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
            run(() => verifyVolume(source(a), a.name, { repair: a.repair, output: a.output }))
          },
        )
        .command(
          'create <name>',
          'create a volume: two replicas in two sites, placed by the witness',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('size', { type: 'string', demandOption: true, describe: 'e.g. 50G, 512M' })
              .option('preferred-domain', {
                type: 'string',
                describe: 'the site where its primary should run',
              })
              .option('on-lost-quorum', {
                choices: ['error', 'suspend'] as const,
                default: 'error' as const,
                describe: 'I/O while no site may serve it: fail with EIO, or hold it',
              })
              .option('resync-rate', {
                type: 'string',
                describe: 'bytes per second a resync may copy, like 100M (default: no limit)',
              })
              .option('follow-the-writer', {
                type: 'boolean',
                default: false,
                describe: 'move the primary to the site that writes most',
              })
              .option('allow-client', {
                type: 'string',
                array: true,
                describe: 'only TLS clients whose certificate has this common name (repeatable)',
              })
              .option('allow-address', {
                type: 'string',
                array: true,
                describe: 'only clients from this address or CIDR block (repeatable)',
              })
              .option('wait', {
                type: 'boolean',
                default: false,
                describe: 'wait until both replicas are in sync, showing the progress',
              }),
          (a) => {
            run(() =>
              a['data-dir'] !== undefined
                ? createVolume(a['data-dir'], a.name, a.size)
                : createCatalogVolume(a.witness, a.name, {
                    size: a.size,
                    preferredDomain: a['preferred-domain'],
                    onLostQuorum: a['on-lost-quorum'],
                    resyncRate: a['resync-rate'],
                    followTheWriter: a['follow-the-writer'],
                    allowClients: a['allow-client'],
                    allowAddresses: a['allow-address'],
                    wait: a.wait,
                  }),
            )
          },
        )
        .command(
          'access <name>',
          'who may open a volume over NBD: TLS client certificates and addresses (replaces the lists)',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('allow-client', {
                type: 'string',
                array: true,
                describe: 'a TLS client certificate common name (repeatable)',
              })
              .option('allow-address', {
                type: 'string',
                array: true,
                describe: 'an address or CIDR block (repeatable)',
              })
              .option('open', {
                type: 'boolean',
                default: false,
                describe: 'clear both lists: every client may open the volume',
              }),
          (a) => {
            run(() =>
              setVolumeAccess(a.witness, a.name, {
                allowClients: a['allow-client'] ?? [],
                allowAddresses: a['allow-address'] ?? [],
                open: a.open,
              }),
            )
          },
        )
        .command(
          'show <name>',
          "a volume's replicas, primary, epoch and sync state",
          (c) => outputOption(c).positional('name', { type: 'string', demandOption: true }),
          (a) => {
            run(() => showCatalogVolume(a.witness, a.name, a.output))
          },
        )
        .command(
          'move <name>',
          "rebuild one of a volume's replicas on another node of the same site, without stopping I/O",
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('from', { type: 'string', describe: 'the node whose replica moves' })
              .option('to', {
                type: 'string',
                describe: 'the node it moves to (default: the node of that site with most space)',
              })
              .option('cancel', {
                type: 'boolean',
                default: false,
                describe: 'stop a move that has not completed',
              })
              .option('wait', {
                type: 'boolean',
                default: false,
                describe: 'wait until the new replica has taken over, showing progress',
              }),
          (a) => {
            run(() =>
              moveCatalogVolume(a.witness, a.name, {
                from: a.from,
                to: a.to,
                cancel: a.cancel,
                wait: a.wait,
              }),
            )
          },
        )
        .command(
          'resize <name>',
          'grow a volume (both replicas)',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('size', { type: 'string', demandOption: true, describe: 'the new size' })
              .option('wait', {
                type: 'boolean',
                default: false,
                describe: 'wait until both replicas have grown',
              }),
          (a) => {
            run(() => resizeCatalogVolume(a.witness, a.name, a.size, a.wait))
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
            run(() =>
              a['data-dir'] !== undefined
                ? deleteVolume(a['data-dir'], a.name, a.yes)
                : deleteCatalogVolume(a.witness, a.name, a.yes),
            )
          },
        )
        .command(
          'list',
          'list volumes',
          (c) =>
            c.option('output', { choices: ['table', 'json'] as const, default: 'table' as const }),
          (a) => {
            run(() =>
              a['data-dir'] !== undefined
                ? listVolumes(a['data-dir'], a.output)
                : listCatalogVolumes(a.witness, a.output),
            )
          },
        )
        .demandCommand(
          1,
          'name a volume command: create, list, show, access, move, resize, delete, promote, resolve, status or verify',
        ),
    )
    .command(
      'status',
      'the health of the whole cluster: what needs attention first, nodes, volumes',
      (y) => outputOption(witnessOption(y)),
      (a) => {
        run(() => clusterStatus(a.witness, a.output))
      },
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
    .command('cert', 'a cluster CA and certificates for cluster TLS and NBD (uses openssl)', (y) =>
      y
        .command(
          'ca',
          'create a CA: DIR/ca-cert.pem and DIR/ca-key.pem',
          (c) =>
            c
              .option('dir', { type: 'string', demandOption: true, describe: 'where to write it' })
              .option('name', { type: 'string', default: 'duplex-ca', describe: 'its common name' })
              .option('days', { type: 'number', default: 3650, describe: 'validity' }),
          (a) => {
            run(() => makeCa(a.dir, a.name, a.days))
          },
        )
        .command(
          'issue <name>',
          'issue a node, witness, admin, NBD client or NBD server certificate from the CA',
          (c) =>
            c
              .positional('name', { type: 'string', demandOption: true })
              .option('ca-dir', {
                type: 'string',
                demandOption: true,
                describe: 'the CA directory',
              })
              .option('out', { type: 'string', demandOption: true, describe: 'where to write' })
              .option('kind', {
                choices: certKinds,
                demandOption: true,
                describe:
                  'node, witness, admin (cluster TLS); client (an NBD client); server (NBD only)',
              })
              .option('ip', {
                type: 'string',
                array: true,
                describe: 'a server address (repeatable)',
              })
              .option('dns', {
                type: 'string',
                array: true,
                describe: 'a server host name (repeatable)',
              })
              .option('days', { type: 'number', default: 825, describe: 'validity' }),
          (a) => {
            run(() =>
              issueCert(a.name, {
                caDir: a['ca-dir'],
                out: a.out,
                kind: a.kind,
                ips: a.ip ?? [],
                dnsNames: a.dns ?? [],
                days: a.days,
              }),
            )
          },
        )
        .demandCommand(1, 'name a cert command: ca or issue'),
    )
    .completion('completion', 'print a shell completion script')
    .fail((message: string | undefined, error: Error | undefined) => {
      // yargs passes the handler's own error here too; only usage mistakes are ours to report.
      // A config file it could not take (a YError wrapping ours) is a usage mistake too.
      if (error !== undefined && error.name !== 'YError') throw error
      process.stderr.write(
        `duplex: ${message ?? error?.message ?? ''}\nRun 'duplex --help' for usage.\n`,
      )
      process.exit(ExitCode.USAGE)
    })
    .help()
    .parseAsync()
  return result
}

/** --witness: the witness's Admin service, for every catalog command. */
function witnessOption<T>(y: Argv<T>) {
  return y
    .option('witness', {
      type: 'string',
      default: process.env.DUPLEX_WITNESS ?? defaultWitness,
      describe: "the witness's HOST:PORT (env DUPLEX_WITNESS; default: a local demo's)",
    })
    .option('credentials', {
      type: 'string',
      default: process.env.DUPLEX_CREDENTIALS,
      describe:
        'cluster TLS: a directory with ca-cert.pem, cert.pem, key.pem (duplex cert issue NAME --kind admin); env DUPLEX_CREDENTIALS',
    })
    .middleware((argv) => {
      useCredentials(argv.credentials)
    })
}

function outputOption<T>(y: Argv<T>) {
  return y.option('output', {
    choices: ['table', 'json'] as const,
    default: 'table' as const,
    describe: 'table for people, json for scripts',
  })
}

/** Where the replication commands find the cluster: --cluster FILE, else the catalog. */
function source(args: { witness: string; cluster?: string | undefined }): ClusterSource {
  return { witness: args.witness, clusterFile: args.cluster }
}

main(hideBin(process.argv)).then(
  (code) => {
    process.exitCode = code
  },
  (error: unknown) => {
    process.exitCode = reportError(error)
  },
)
