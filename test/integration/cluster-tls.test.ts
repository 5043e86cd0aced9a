/**
 * Cluster TLS against real processes: a witness, two nodes and the admin CLI, every gRPC
 * connection mutual TLS with certificates from `duplex cert`.
 *
 * - The volume replicates and verifies over TLS.
 * - The CLI without credentials, with a node's certificate, or with another CA's, cannot change
 *   the catalog; nothing changes.
 * - A node with another CA's certificate cannot join (the catalog never sees it) or open a
 *   replication stream.
 * - A node cannot speak for another (a forged grant request, lease or stream is refused); a
 *   replayed grant request of an older epoch changes nothing; a node does not take a peer for
 *   the witness.
 * - The admin promotes a replica and moves one to a new node, over TLS end to end.
 * - Certificates, then the CA itself, are rotated under a verifying writer with SIGHUP and no
 *   restart: new connections show the new certificates, the writer sees no error, and a node
 *   restarted afterwards rejoins with its new certificate.
 * - Bad credentials stop a daemon at start with a sentence saying what is wrong.
 */
import { spawn } from 'node:child_process'
import fs from 'node:fs/promises'
import path from 'node:path'
import tls from 'node:tls'
import t from 'tap'
import type { Test } from 'tap'
import { isDuplexError } from '../../src/core/errors.js'
import { createLogger } from '../../src/core/log.js'
import { credentialFiles, TlsCredentials } from '../../src/core/tls.js'
import { PeerLinkClient } from '../../src/replica/peer-link.js'
import { WitnessClient } from '../../src/witness/witness-service.js'
import { ClusterPki, installCredentials } from '../lib/cluster-pki.js'
import {
  adminCli,
  cliPath,
  duplex,
  freePorts,
  missingTools,
  rejection,
  run,
  spawnDaemon,
  startWitness,
  tempDir,
  until,
} from '../lib/node-process.js'
import type { DaemonProcess, WitnessProcess } from '../lib/node-process.js'
import { SteadyWriter } from '../lib/steady-writer.js'

const skip = await missingTools(['qemu-io', 'openssl'])

interface NodeRow {
  name: string
  up: boolean
  nbd: string
}

interface VolumeRow {
  name: string
  owner?: string
  inSync?: boolean
  epoch?: number
}

function credentialsOf(dir: string): TlsCredentials {
  return new TlsCredentials({
    files: credentialFiles(dir),
    log: createLogger('test'),
    reloadMs: 0,
  })
}

interface TlsCluster {
  witness: WitnessProcess
  nodes: Map<string, DaemonProcess>
  dirs: Map<string, string>
  replication: Map<string, string>
  admin: ReturnType<typeof adminCli>
  nbdPort(name: string): Promise<number>
  startNode(name: string): Promise<DaemonProcess>
}

/** Witness w and nodes a1 (site-a), b1 (site-b), each with the credentials directory given. */
async function startTlsCluster(
  t: Test,
  credentials: { w: string; a1: string; b1: string; admin: string },
): Promise<TlsCluster> {
  const witness = await startWitness({ extraArgs: ['--credentials', credentials.w] })
  t.teardown(() => witness.stop())
  const admin = adminCli(witness.address, 120_000, ['--credentials', credentials.admin])
  await admin.ok(t, 'domain', 'add', 'site-a')
  await admin.ok(t, 'domain', 'add', 'site-b')
  await admin.ok(t, 'domain', 'add', 'site-w', '--kind', 'witness')
  const port = await freePorts(2)
  const replication = new Map([
    ['a1', `127.0.0.1:${port}`],
    ['b1', `127.0.0.1:${port + 1}`],
  ])
  const sites: Record<string, string> = { a1: 'site-a', b1: 'site-b' }
  for (const [name, address] of replication) {
    await admin.ok(t, 'node', 'add', name, '--domain', sites[name] ?? '', '--address', address)
  }
  const nodes = new Map<string, DaemonProcess>()
  const dirs = new Map<string, string>()
  t.teardown(async () => {
    await Promise.all([...nodes.values()].map((node) => node.stop()))
    await Promise.all([...dirs.values()].map((dir) => fs.rm(dir, { recursive: true, force: true })))
  })
  const nodeCredentials: Record<string, string> = { a1: credentials.a1, b1: credentials.b1 }
  const startNode = async (name: string): Promise<DaemonProcess> => {
    let dir = dirs.get(name)
    if (dir === undefined) {
      dir = await tempDir(`duplex-${name}-`)
      dirs.set(name, dir)
    }
    const node = await spawnDaemon(name, [
      ...['node', '--name', name, '--data-dir', dir, '--listen', '127.0.0.1:0'],
      ...['--witness', witness.address, '--credentials', nodeCredentials[name] ?? ''],
    ])
    nodes.set(name, node)
    return node
  }
  await startNode('a1')
  await startNode('b1')
  const nbdPort = async (name: string): Promise<number> => {
    const rows = await until(`${name} up`, async () => {
      const listed = await admin.json<NodeRow[]>('node', 'list')
      return listed.find((row) => row.name === name && row.up && row.nbd !== '')
        ? listed
        : undefined
    })
    return Number(rows.find((row) => row.name === name)?.nbd.split(':')[1])
  }
  await nbdPort('a1')
  await nbdPort('b1')
  await admin.ok(
    t,
    'volume',
    'create',
    'vol',
    '--size',
    '64M',
    '--preferred-domain',
    'site-a',
    '--wait',
  )
  return { witness, nodes, dirs, replication, admin, nbdPort, startNode }
}

async function volumeRow(cluster: TlsCluster): Promise<VolumeRow> {
  const rows = await cluster.admin.json<VolumeRow[]>('volume', 'list')
  const row = rows.find((each) => each.name === 'vol')
  if (row === undefined) throw new Error('no volume vol')
  return row
}

t.test(
  'a cluster with mutual TLS: it replicates, and refuses whoever lacks the credentials',
  { skip: skip ?? false, timeout: 240_000 },
  async (t) => {
    const pki = await ClusterPki.temporary(t, 'duplex-cluster-tls-')
    const { dir } = pki
    await pki.makeCa('cluster')
    await pki.makeCa('stranger')
    const creds = {
      w: await pki.issue('cluster', 'w', 'witness'),
      a1: await pki.issue('cluster', 'a1', 'node'),
      b1: await pki.issue('cluster', 'b1', 'node'),
      admin: await pki.issue('cluster', 'alice', 'admin'),
    }
    const b2 = await pki.issue('cluster', 'b2', 'node')
    const eve = await pki.issue('stranger', 'eve', 'admin')
    const impostor = await pki.issue('stranger', 'x9', 'node')
    const cluster = await startTlsCluster(t, creds)
    const { admin, witness } = cluster

    // Replication over TLS: written through a1, read through b1, verified by the CLI.
    const a1 = await cluster.nbdPort('a1')
    const b1 = await cluster.nbdPort('b1')
    const wrote = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'write -P 0x3c 0 4M', `nbd://127.0.0.1:${a1}/vol`],
    ])
    t.equal(wrote.code, 0, `write through a1: ${wrote.stderr}`)
    const read = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x3c 0 4M', `nbd://127.0.0.1:${b1}/vol`],
    ])
    t.equal(read.code, 0, `the write reads back through b1: ${read.stdout}${read.stderr}`)
    const verified = await admin.cli('volume', 'verify', 'vol')
    t.equal(verified.code, 0, `the CLI verifies the replicas over TLS: ${verified.stderr}`)
    const before = await volumeRow(cluster)
    t.equal(before.inSync, true, 'in sync')

    // The CLI without an admin certificate changes nothing.
    const refusals: [string, string[], number, RegExp][] = [
      ['no credentials', [], 4, /this side needs --credentials DIR/],
      ['a node certificate', ['--credentials', creds.a1], 5, /needs a duplex-admin certificate/],
      ['another CA', ['--credentials', eve], 4, /TLS handshake may have failed/],
    ]
    const mixed = path.join(dir, 'mixed')
    await fs.mkdir(mixed)
    await fs.copyFile(path.join(eve, 'cert.pem'), path.join(mixed, 'cert.pem'))
    await fs.copyFile(path.join(eve, 'key.pem'), path.join(mixed, 'key.pem'))
    await fs.writeFile(
      path.join(mixed, 'ca-cert.pem'),
      (await pki.caCert('cluster')) + (await pki.caCert('stranger')),
    )
    refusals.push([
      "another CA's certificate, trusting ours",
      ['--credentials', mixed],
      4,
      /TLS handshake may have failed/,
    ])
    for (const [who, args, code, message] of refusals) {
      const cli = adminCli(witness.address, 60_000, args)
      const added = await cli.cli('domain', 'add', 'site-x')
      t.equal(added.code, code, `${who}: domain add refused (exit ${code})`)
      t.match(added.stderr, message, `${who}: says why`)
      const deleted = await cli.cli('volume', 'delete', 'vol', '--yes')
      t.not(deleted.code, 0, `${who}: volume delete refused`)
    }
    const readAsNode = await adminCli(witness.address, 60_000, ['--credentials', creds.a1]).cli(
      'node',
      'list',
    )
    t.equal(readAsNode.code, 0, `a node's certificate may read the catalog: ${readAsNode.stderr}`)
    const domains = await admin.json<{ name: string }[]>('domain', 'list')
    t.notOk(
      domains.some((domain) => domain.name === 'site-x'),
      'the catalog has no site-x',
    )
    t.equal((await volumeRow(cluster)).name, 'vol', 'the volume is still there')

    // A node with another CA's certificate cannot join.
    await admin.ok(t, 'node', 'add', 'x9', '--domain', 'site-a', '--address', '127.0.0.1:1')
    const x9Dir = await tempDir('duplex-x9-')
    t.teardown(() => fs.rm(x9Dir, { recursive: true, force: true }))
    // It waits for the catalog before it serves, so it never prints a ready line.
    const outsider = spawn(
      process.execPath,
      [
        cliPath,
        ...['node', '--name', 'x9', '--data-dir', x9Dir, '--listen', '127.0.0.1:0'],
        ...['--witness', witness.address, '--credentials', impostor],
      ],
      { stdio: ['ignore', 'ignore', 'pipe'] },
    )
    let outsiderLog = ''
    outsider.stderr.setEncoding('utf8')
    outsider.stderr.on('data', (text: string) => {
      outsiderLog += text
    })
    t.teardown(() => {
      outsider.kill('SIGKILL')
    })
    await until('x9 says why it cannot join', () =>
      Promise.resolve(/TLS handshake may have failed/.test(outsiderLog) ? true : undefined),
    )
    const rows = await admin.json<NodeRow[]>('node', 'list')
    t.equal(rows.find((row) => row.name === 'x9')?.up, false, 'the witness never heard from x9')

    // ... nor replicate: a stream from it to b1 fails in the TLS handshake.
    const stranger = credentialsOf(impostor)
    t.teardown(() => {
      stranger.close()
    })
    const streamError = await openHello(
      cluster.replication.get('b1') ?? '',
      stranger.channelCredentials({ role: 'node', name: 'b1' }),
      { volume: 'vol', epoch: before.epoch ?? 0, fromNode: 'a1' },
    )
    t.match(String(streamError), /unavailable|closed|TLS|certificate/i, 'its stream is refused')

    // A node of this cluster cannot speak for another.
    const b2Tls = credentialsOf(b2)
    t.teardown(() => {
      b2Tls.close()
    })
    const asB2 = new WitnessClient(witness.address, {
      credentials: b2Tls.channelCredentials({ role: 'witness' }),
    })
    t.teardown(() => {
      asB2.close()
    })
    const owner = before.owner ?? ''
    const other = owner === 'a1' ? 'b1' : 'a1'
    const epoch = before.epoch ?? 0
    const forged: [string, Promise<unknown>][] = [
      [`takeover as ${other}`, asB2.takeover({ volume: 'vol', node: other, epoch })],
      [`degrade as ${owner}`, asB2.degrade({ volume: 'vol', node: owner, epoch })],
      [`a lease for ${owner}`, asB2.heartbeat(owner)],
      [
        `a handover from ${owner}`,
        asB2.recordHandover({ volume: 'vol', fromNode: owner, toNode: other, epoch }),
      ],
    ]
    for (const [what, call] of forged) {
      const error = await rejection(call)
      t.ok(isDuplexError(error, 'PERMISSION_DENIED'), `b2 cannot ask for ${what}`)
      t.match(String(error), /the certificate for b2/)
    }
    const ownName = await rejection(asB2.takeover({ volume: 'vol', node: 'b2', epoch }))
    t.ok(isDuplexError(ownName, 'INVALID_ARGUMENT'), 'in its own name b2 holds no replica')
    const hello = await openHello(
      cluster.replication.get(other) ?? '',
      b2Tls.channelCredentials({ role: 'node', name: other }),
      { volume: 'vol', epoch, fromNode: owner },
    )
    t.match(String(hello), /names b2, not/, `a stream from b2 as ${owner} is refused`)

    // A node does not take a peer for the witness.
    const ownerTls = credentialsOf(owner === 'a1' ? creds.a1 : creds.b1)
    t.teardown(() => {
      ownerTls.close()
    })
    const fakeWitness = new WitnessClient(cluster.replication.get(other) ?? '', {
      credentials: ownerTls.channelCredentials({ role: 'witness' }),
    })
    t.teardown(() => {
      fakeWitness.close()
    })
    const fake = await rejection(fakeWitness.status(3000))
    t.ok(
      isDuplexError(fake, 'UNAVAILABLE'),
      `a node's certificate is not a witness's: ${String(fake)}`,
    )
    const after = await volumeRow(cluster)
    t.same(
      { owner: after.owner, epoch: after.epoch, inSync: after.inSync },
      { owner: before.owner, epoch: before.epoch, inSync: true },
      'the witness record did not change',
    )

    // The admin moves the primary role (a new generation, over TLS); the old owner's requests
    // of the generation before, replayed, grant nothing.
    await admin.ok(t, 'volume', 'promote', 'vol', '--node', other)
    const promoted = await until('the promotion is recorded', async () => {
      const row = await volumeRow(cluster)
      return row.owner === other && row.inSync === true ? row : undefined
    })
    const asOwner = new WitnessClient(witness.address, {
      credentials: ownerTls.channelCredentials({ role: 'witness' }),
    })
    t.teardown(() => {
      asOwner.close()
    })
    const handover = { volume: 'vol', fromNode: owner, toNode: other, epoch }
    const replayedHandover = await asOwner.recordHandover(handover)
    t.equal(replayedHandover.epoch, promoted.epoch, 'a replayed handover grants no new epoch')
    const replayed = await rejection(asOwner.degrade({ volume: 'vol', node: owner, epoch }))
    t.ok(
      isDuplexError(replayed, 'FAILED_PRECONDITION'),
      `a replayed degrade of the old generation is refused: ${String(replayed)}`,
    )
    const final = await volumeRow(cluster)
    t.same(
      { owner: final.owner, epoch: final.epoch, inSync: final.inSync },
      { owner: other, epoch: promoted.epoch, inSync: true },
      'the witness record is the promotion',
    )
    const again = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x3c 0 4M', `nbd://127.0.0.1:${b1}/vol`],
    ])
    t.equal(again.code, 0, 'the data is intact')

    // A replica moves to a new node of site-a: every step between the nodes and with the witness
    // (copy, adopt, cutover, the witness's replace) passes the authorization rules.
    await admin.ok(t, 'node', 'remove', 'x9', '--yes')
    const a2Port = await freePorts(1)
    await admin.ok(t, 'node', 'add', 'a2', '--domain', 'site-a', '--address', `127.0.0.1:${a2Port}`)
    const a2Dir = await tempDir('duplex-a2-')
    t.teardown(() => fs.rm(a2Dir, { recursive: true, force: true }))
    const a2 = await spawnDaemon('a2', [
      ...['node', '--name', 'a2', '--data-dir', a2Dir, '--listen', '127.0.0.1:0'],
      ...['--witness', witness.address, '--credentials', await pki.issue('cluster', 'a2', 'node')],
    ])
    t.teardown(() => a2.stop())
    const a2Nbd = await cluster.nbdPort('a2')
    await admin.ok(t, 'volume', 'move', 'vol', '--from', 'a1', '--to', 'a2', '--wait')
    const moved = await run('qemu-io', [
      ...['-f', 'raw', '-c', 'read -P 0x3c 0 4M', `nbd://127.0.0.1:${a2Nbd}/vol`],
    ])
    t.equal(moved.code, 0, `the moved replica on a2 holds the data: ${moved.stderr}`)
    const verifiedAfter = await admin.cli('volume', 'verify', 'vol')
    t.equal(verifiedAfter.code, 0, `the replicas on a2 and b1 are equal: ${verifiedAfter.stderr}`)
  },
)

/** Opens a replication stream with `hello` and returns why it failed. */
async function openHello(
  address: string,
  credentials: ReturnType<TlsCredentials['channelCredentials']>,
  hello: { volume: string; epoch: number; fromNode: string },
): Promise<unknown> {
  const client = new PeerLinkClient({ credentials, helloTimeoutMs: 5000 })
  client.connect(address)
  try {
    const stream = await client.openStream(
      { ...hello, incarnation: Buffer.alloc(16, 7) },
      {
        onAck: () => undefined,
        onFlushAck: () => undefined,
        onReject: () => undefined,
        onRejectFlush: () => undefined,
        onClosed: () => undefined,
      },
    )
    stream.close('SHUTTING_DOWN', 'test done')
    return new Error('the stream was accepted')
  } catch (error) {
    return error
  } finally {
    client.close()
  }
}

/** The serial number of the certificate the TLS server at `address` presents now. */
async function presentedSerial(address: string, credentials: string): Promise<string> {
  const [host, port] = address.split(':')
  const files = credentialFiles(credentials)
  const socket = tls.connect({
    host,
    port: Number(port),
    ca: await fs.readFile(files.ca),
    cert: await fs.readFile(files.cert),
    key: await fs.readFile(files.key),
    servername: 'duplex',
    ALPNProtocols: ['h2'],
    checkServerIdentity: () => undefined,
  })
  try {
    await new Promise<void>((resolve, reject) => {
      socket.once('secureConnect', resolve)
      socket.once('error', reject)
    })
    return socket.getPeerCertificate().serialNumber
  } finally {
    socket.destroy()
  }
}

async function serialOf(credentials: string): Promise<string> {
  const { X509Certificate } = await import('node:crypto')
  return new X509Certificate(await fs.readFile(credentialFiles(credentials).cert)).serialNumber
}

t.test(
  'certificates and then the CA rotate under a writer, without a restart',
  { skip: skip ?? false, timeout: 240_000 },
  async (t) => {
    const pki = await ClusterPki.temporary(t, 'duplex-rotate-')
    const { dir } = pki
    await pki.makeCa('old')
    // The live directories the daemons read; rotation replaces their files.
    const live: Record<string, string> = {}
    for (const [name, kind] of [
      ['w', 'witness'],
      ['a1', 'node'],
      ['b1', 'node'],
      ['alice', 'admin'],
    ] as const) {
      const issued = await pki.issue('old', name, kind)
      live[name] = path.join(dir, 'live', name)
      await fs.mkdir(live[name], { recursive: true })
      await installCredentials(issued, live[name])
    }
    const cluster = await startTlsCluster(t, {
      w: live.w ?? '',
      a1: live.a1 ?? '',
      b1: live.b1 ?? '',
      admin: live.alice ?? '',
    })
    const writer = await SteadyWriter.start(await cluster.nbdPort('a1'), 'vol', 0, 256)
    t.teardown(() => writer.stop())
    await writer.progress(100)
    const daemons = (): DaemonProcess[] => [cluster.witness, ...cluster.nodes.values()]
    const a1Replication = cluster.replication.get('a1') ?? ''

    const hangUp = async (expectSerial: Record<string, string>): Promise<void> => {
      for (const daemon of daemons()) daemon.child.kill('SIGHUP')
      for (const [name, serial] of Object.entries(expectSerial)) {
        const daemon = name === 'w' ? cluster.witness : cluster.nodes.get(name)
        await until(`${name} installs certificate ${serial}`, () =>
          Promise.resolve(daemon?.stderr().includes(serial) === true ? true : undefined),
        )
      }
    }

    // 1. New certificates from the same CA.
    const second: Record<string, string> = {}
    for (const [name, kind] of [
      ['w', 'witness'],
      ['a1', 'node'],
      ['b1', 'node'],
    ] as const) {
      const issued = await pki.issue('old', name, kind, 'second')
      await installCredentials(issued, live[name] ?? '')
      second[name] = await serialOf(issued)
    }
    await hangUp(second)
    t.equal(
      await presentedSerial(a1Replication, live.alice ?? ''),
      second.a1,
      'a new connection to a1 gets its new certificate',
    )
    await writer.progress(100)

    // 2. A new CA: trust both, move every certificate to the new CA, then drop the old one.
    await pki.makeCa('new')
    const both = (await pki.caCert('old')) + (await pki.caCert('new'))
    for (const name of ['w', 'a1', 'b1', 'alice']) {
      await fs.writeFile(path.join(live[name] ?? '', 'ca-cert.pem'), both)
    }
    for (const daemon of daemons()) daemon.child.kill('SIGHUP')
    const third: Record<string, string> = {}
    for (const [name, kind] of [
      ['w', 'witness'],
      ['a1', 'node'],
      ['b1', 'node'],
      ['alice', 'admin'],
    ] as const) {
      const issued = await pki.issue('new', name, kind, 'third')
      await installCredentials(issued, live[name] ?? '', both)
      if (name !== 'alice') third[name] = await serialOf(issued)
    }
    await hangUp(third)
    await writer.progress(100)
    const onlyNew = await pki.caCert('new')
    for (const name of ['w', 'a1', 'b1', 'alice']) {
      await fs.writeFile(path.join(live[name] ?? '', 'ca-cert.pem'), onlyNew)
    }
    for (const daemon of daemons()) daemon.child.kill('SIGHUP')
    await writer.progress(100)
    t.equal(
      await presentedSerial(a1Replication, live.alice ?? ''),
      third.a1,
      'a1 presents the certificate of the new CA',
    )
    const listed = await cluster.admin.cli('volume', 'list')
    t.equal(listed.code, 0, `the admin's new certificate works: ${listed.stderr}`)
    const oldAlice = path.join(dir, 'issued-old', 'alice')
    const refused = await adminCli(cluster.witness.address, 60_000, [
      '--credentials',
      oldAlice,
    ]).cli('volume', 'list')
    t.equal(refused.code, 4, 'a certificate of the dropped CA is refused')

    // A node restarted now rejoins with its new certificate and resyncs.
    await cluster.nodes.get('b1')?.kill()
    await writer.progress(100)
    await cluster.startNode('b1')
    await until(
      'b1 back in sync',
      async () => ((await volumeRow(cluster)).inSync === true ? true : undefined),
      60_000,
    )
    await writer.progress(100)
    const report = await writer.stop()
    t.equal(report.errors, 0, `the writer saw no error: ${report.lastError ?? ''}`)
    t.ok(report.acknowledged > 700, `${report.acknowledged} writes acknowledged`)
    t.same(await writer.verify(await cluster.nbdPort('b1'), 'vol'), [], 'every write reads on b1')
    for (const daemon of daemons()) {
      t.notMatch(daemon.stderr(), /not usable; keeping/, 'no half-replaced set was installed')
    }
  },
)

t.test('bad credentials stop a daemon with a clear error', { skip: skip ?? false }, async (t) => {
  const pki = await ClusterPki.temporary(t, 'duplex-badcreds-')
  const { dir } = pki
  await pki.makeCa('cluster')
  await pki.makeCa('stranger')
  const a1 = await pki.issue('cluster', 'a1', 'node')
  const w = await pki.issue('cluster', 'w', 'witness')
  const expired = await pki.issueExpired('cluster', 'a1', 'node')
  const foreign = path.join(dir, 'foreign')
  await fs.mkdir(foreign)
  const strangerA1 = await pki.issue('stranger', 'a1', 'node')
  await fs.copyFile(path.join(a1, 'ca-cert.pem'), path.join(foreign, 'ca-cert.pem'))
  await fs.copyFile(path.join(strangerA1, 'cert.pem'), path.join(foreign, 'cert.pem'))
  await fs.copyFile(path.join(strangerA1, 'key.pem'), path.join(foreign, 'key.pem'))
  const mismatched = path.join(dir, 'mismatched')
  await fs.mkdir(mismatched)
  await fs.copyFile(path.join(a1, 'ca-cert.pem'), path.join(mismatched, 'ca-cert.pem'))
  await fs.copyFile(path.join(a1, 'cert.pem'), path.join(mismatched, 'cert.pem'))
  await fs.copyFile(path.join(w, 'key.pem'), path.join(mismatched, 'key.pem'))
  const node = (name: string, credentials: string): string[] => [
    ...['node', '--name', name, '--data-dir', path.join(dir, `data-${name}`)],
    ...['--listen', '127.0.0.1:0', '--witness', '127.0.0.1:1', '--credentials', credentials],
  ]
  const witness = (credentials: string): string[] => [
    ...['witness', '--data-dir', path.join(dir, 'witness'), '--listen', '127.0.0.1:0'],
    ...['--credentials', credentials],
  ]
  const cases: [string, string[], RegExp][] = [
    [
      'a missing directory',
      node('a1', path.join(dir, 'nope')),
      /cannot read the TLS .*no such file/,
    ],
    ['an expired certificate', node('a1', expired), /expired on .* UTC/],
    ["another CA's certificate", node('a1', foreign), /was issued by CN=stranger, not by a CA in/],
    ['a key of another certificate', node('a1', mismatched), /does not belong to the certificate/],
    ["another node's certificate", node('b1', a1), /the certificate names a1, not b1/],
    ['a node certificate on the witness', witness(a1), /a duplex-witness certificate is needed/],
    [
      '--credentials without a cluster',
      ['node', '--data-dir', path.join(dir, 'data-x'), '--credentials', a1],
      /give --witness or --cluster too/,
    ],
  ]
  for (const [what, args, message] of cases) {
    const result = await duplex(args, 30_000)
    t.equal(result.code, 2, `${what}: exit code 2`)
    t.match(result.stderr, message, `${what}: says what is wrong`)
  }
})
