/**
 * NBD over TLS the way QEMU does it (NBD_OPT_STARTTLS, x509), with real clients: qemu-io and
 * qemu-img with `--object tls-creds-x509`, nbdinfo and nbdcopy with `nbds://` read and write a
 * volume; a node that requires TLS refuses plaintext clients (NBD_REP_ERR_TLS_REQD), clients
 * without a certificate and clients whose certificate another CA signed, before they reach any
 * data; a node that only offers TLS serves both; a volume's access lists let in only the
 * certificates and addresses they name; bad TLS settings are clear errors at start; a replaced
 * certificate serves new clients after SIGHUP while sessions opened before stay up.
 */
import t from 'tap'
import type { Test } from 'tap'
import fs from 'node:fs/promises'
import path from 'node:path'
import tls from 'node:tls'
import { X509Certificate } from 'node:crypto'
import { duplex, missingTools, run, spawnDaemon, tempDir, until } from '../lib/node-process.js'
import { NbdClient } from '../lib/nbd-client.js'
import { ClientFlag, Opt, Rep } from '../../src/nbd/protocol.js'
import type { DaemonProcess } from '../lib/node-process.js'
import { makePki } from '../lib/tls-certs.js'
import { startPair } from '../lib/cluster.js'

const skip = await missingTools(['qemu-io', 'qemu-img', 'nbdinfo', 'nbdcopy', 'openssl'])

async function startTlsNode(
  t: Test,
  dir: string,
  tlsArgs: string[],
): Promise<{ daemon: DaemonProcess; address: string }> {
  await fs.mkdir(dir, { recursive: true })
  const created = await duplex(['volume', 'create', 'v', '--size', '64M', '--data-dir', dir])
  t.equal(created.code, 0, created.stderr)
  const daemon = await spawnDaemon('tls node', [
    ...['node', '--name', 'n', '--data-dir', dir, '--listen', '127.0.0.1:0'],
    ...tlsArgs,
  ])
  t.teardown(() => daemon.stop())
  const address = /nbd:\/\/(\S+)/.exec(daemon.ready)?.[1] ?? ''
  return { daemon, address }
}

function qemuTls(
  clientDir: string,
  address: string,
  ...commands: string[]
): Promise<{
  code: number
  stdout: string
  stderr: string
}> {
  const [host, port] = address.split(':')
  return run('qemu-io', [
    ...['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${clientDir}`],
    '--image-opts',
    ...commands.flatMap((command) => ['-c', command]),
    `driver=nbd,host=${host ?? ''},port=${port ?? ''},export=v,tls-creds=tls0`,
  ])
}

t.test('a node that requires TLS with client certificates', { skip: skip ?? false }, async (t) => {
  const dir = await tempDir('duplex-tls-')
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
  const pki = await makePki(path.join(dir, 'pki'))
  const { address } = await startTlsNode(t, path.join(dir, 'node'), [
    ...['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey, '--tls-ca', pki.caCert],
    '--tls-required',
  ])

  const written = await qemuTls(pki.clientDir, address, 'write -P 0x3c 1M 4M', 'read -P 0x3c 1M 4M')
  t.equal(written.code, 0, `qemu-io over TLS writes and reads: ${written.stderr}`)
  const info = await run('nbdinfo', [`nbds://${address}/v?tls-certificates=${pki.clientDir}`])
  t.equal(info.code, 0, info.stderr)
  t.match(info.stdout, /newstyle-fixed with TLS/, 'nbdinfo negotiated TLS')
  t.match(info.stdout, /export-size: 67108864/)

  // nbdcopy copies the volume out over TLS and back in; qemu-img reads it over TLS.
  const uri = `nbds://${address}/v?tls-certificates=${pki.clientDir}`
  const copy = path.join(dir, 'copy.raw')
  const out = await run('nbdcopy', [uri, copy])
  t.equal(out.code, 0, `nbdcopy out over TLS: ${out.stderr}`)
  const copied = await fs.readFile(copy)
  t.ok(
    copied.subarray(1 << 20, 5 << 20).equals(Buffer.alloc(4 << 20, 0x3c)),
    'the copy holds the write',
  )
  copied.fill(0x5b, 8 << 20, 9 << 20)
  await fs.writeFile(copy, copied)
  const back = await run('nbdcopy', [copy, uri])
  t.equal(back.code, 0, `nbdcopy in over TLS: ${back.stderr}`)
  const [host, port] = address.split(':')
  const qemuImg = await run('qemu-img', [
    ...['compare', '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.clientDir}`],
    ...['--image-opts', `driver=nbd,host=${host ?? ''},port=${port ?? ''},export=v,tls-creds=tls0`],
    ...['--image-opts', `driver=raw,file.driver=file,file.filename=${copy}`],
  ])
  t.equal(
    qemuImg.code,
    0,
    `qemu-img over TLS finds the volume equal to the copy: ${qemuImg.stdout}${qemuImg.stderr}`,
  )

  const plain = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `nbd://${address}/v`])
  t.not(plain.code, 0, 'a plaintext client is refused')
  t.match(plain.stderr, /this server requires TLS/)
  const plainInfo = await run('nbdinfo', [`nbd://${address}/v`])
  t.not(plainInfo.code, 0, 'nbdinfo in the clear is refused too')

  for (const [who, clientDir] of [
    ['a client without a certificate', pki.anonymousDir],
    ['a client whose certificate another CA signed', pki.strangerDir],
  ] as const) {
    const refused = await qemuTls(clientDir, address, 'read -P 0x3c 1M 4k')
    t.not(refused.code, 0, `${who} is refused`)
    t.notMatch(refused.stdout, /read 4096\/4096/, `${who} reads nothing`)
    const viaNbdinfo = await run('nbdinfo', [`nbds://${address}/v?tls-certificates=${clientDir}`])
    t.not(viaNbdinfo.code, 0, `${who}: nbdinfo refused`)
  }
  const again = await qemuTls(pki.clientDir, address, 'read -P 0x3c 1M 4M')
  t.equal(again.code, 0, 'the data is intact and still served to the good client')
})

t.test(
  'a node that offers TLS serves plaintext and TLS clients',
  { skip: skip ?? false },
  async (t) => {
    const dir = await tempDir('duplex-tls-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const pki = await makePki(path.join(dir, 'pki'))
    const { address } = await startTlsNode(t, path.join(dir, 'node'), [
      ...['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey],
    ])
    const secure = await qemuTls(pki.anonymousDir, address, 'write -P 0x5e 0 1M')
    t.equal(secure.code, 0, `server-only TLS: ${secure.stderr}`)
    const plain = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'read -P 0x5e 0 1M',
      `nbd://${address}/v`,
    ])
    t.equal(plain.code, 0, `and in the clear: ${plain.stderr}`)
  },
)

t.test('bad TLS settings stop the node with a clear error', { skip: skip ?? false }, async (t) => {
  const dir = await tempDir('duplex-tls-')
  t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
  const pki = await makePki(path.join(dir, 'pki'))
  const node = ['node', '--data-dir', path.join(dir, 'node'), '--listen', '127.0.0.1:0']
  const cases: [string[], RegExp][] = [
    [['--tls-cert', pki.serverCert], /needs both --tls-cert and --tls-key/],
    [['--tls-required'], /--tls-ca and --tls-required need --tls-cert and --tls-key/],
    [
      ['--tls-cert', pki.serverCert, '--tls-key', path.join(dir, 'nope.pem')],
      /cannot read the TLS key/,
    ],
    [
      ['--tls-cert', pki.serverCert, '--tls-key', pki.caCert],
      /the TLS key .* is not a PEM private key/,
    ],
  ]
  for (const [args, message] of cases) {
    const result = await duplex([...node, ...args], 30_000)
    t.equal(result.code, 2, `${args.join(' ')}: exit code 2`)
    t.match(result.stderr, message)
  }
})

t.test(
  "a volume's access lists: only the certificates and addresses it names",
  { skip: skip ?? false },
  async (t) => {
    const dir = await tempDir('duplex-tls-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const pki = await makePki(path.join(dir, 'pki'))
    const tlsArgs = [
      '--tls-cert',
      pki.serverCert,
      '--tls-key',
      pki.serverKey,
      '--tls-ca',
      pki.caCert,
    ]
    const pair = await startPair({
      access: { clients: ['client'], addresses: ['127.0.0.0/8', '::1'] },
      nodeArgs: {
        a: [...tlsArgs, '--tls-required'],
        b: ['--tls-cert', pki.serverCert, '--tls-key', pki.serverKey],
      },
    })
    t.teardown(() => pair.destroy())
    const a = `127.0.0.1:${pair.a.port}`
    const b = `127.0.0.1:${pair.b.port}`
    const qemu = (clientDir: string, address: string, command: string) => {
      const [host, port] = address.split(':')
      return run('qemu-io', [
        ...['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${clientDir}`],
        ...['--image-opts', '-c', command],
        `driver=nbd,host=${host ?? ''},port=${port ?? ''},export=vol,tls-creds=tls0`,
      ])
    }
    const allowed = await qemu(pki.clientDir, a, 'write -P 0x7a 0 1M')
    t.equal(allowed.code, 0, `the named certificate opens the volume: ${allowed.stderr}`)
    const other = await qemu(pki.otherClientDir, a, 'read -P 0x7a 0 1M')
    t.not(other.code, 0, 'another certificate of the same CA is refused')
    t.match(other.stderr, /the certificate "other-client" may not open volume vol/)
    const list = await run('nbdinfo', [
      '--list',
      `nbds://${a}?tls-certificates=${pki.otherClientDir}`,
    ])
    t.notMatch(list.stdout, /export="vol"/, 'and does not see it in the export list')
    // node-b offers TLS but does not check client certificates: a plaintext client has none.
    const plain = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `nbd://${b}/vol`])
    t.not(plain.code, 0, 'a client without a certificate is refused where the volume names clients')
    t.match(plain.stderr, /open only to TLS clients with a certificate it names/)
  },
)

t.test(
  'certificates made with duplex cert serve qemu-io over TLS',
  { skip: skip ?? false },
  async (t) => {
    const dir = await tempDir('duplex-cert-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const ca = path.join(dir, 'ca')
    const out = path.join(dir, 'issued')
    const made = await duplex(['cert', 'ca', '--dir', ca])
    t.equal(made.code, 0, made.stderr)
    t.equal(
      (await fs.stat(path.join(ca, 'ca-key.pem'))).mode & 0o777,
      0o600,
      'the CA key is private',
    )
    const server = await duplex([
      ...['cert', 'issue', 'n1', '--ca-dir', ca, '--out', out, '--kind', 'server'],
      ...['--ip', '127.0.0.1', '--dns', 'localhost'],
    ])
    t.equal(server.code, 0, server.stderr)
    const client = await duplex([
      'cert',
      'issue',
      'hv1',
      '--ca-dir',
      ca,
      '--out',
      out,
      '--kind',
      'client',
    ])
    t.equal(client.code, 0, client.stderr)
    t.match(client.stdout, /client directory for qemu/)
    const noAddress = await duplex([
      'cert',
      'issue',
      'n2',
      '--ca-dir',
      ca,
      '--out',
      out,
      '--kind',
      'server',
    ])
    t.equal(noAddress.code, 2, 'a server certificate needs an address or a name')
    t.match(noAddress.stderr, /give --ip and\/or --dns/)
    const badIp = await duplex([
      ...['cert', 'issue', 'n3', '--ca-dir', ca, '--out', out, '--kind', 'server', '--ip', '1.2.3'],
    ])
    t.equal(badIp.code, 2)
    t.match(badIp.stderr, /--ip 1\.2\.3 is not an IP address/)

    const { address } = await startTlsNode(t, path.join(dir, 'node'), [
      ...['--tls-cert', path.join(out, 'n1-cert.pem'), '--tls-key', path.join(out, 'n1-key.pem')],
      ...['--tls-ca', path.join(ca, 'ca-cert.pem'), '--tls-required'],
    ])
    const io = await qemuTls(
      path.join(out, 'hv1'),
      address,
      'write -P 0x4d 0 1M',
      'read -P 0x4d 0 1M',
    )
    t.equal(io.code, 0, `qemu-io with the issued client directory: ${io.stderr}`)
  },
)

/** An NBD connection taken through STARTTLS to an open TLS session (no export chosen). */
async function startTlsSession(address: string, caFile: string): Promise<tls.TLSSocket> {
  const [host, port] = address.split(':')
  const client = await NbdClient.connect(Number(port), host)
  await client.greeting()
  client.sendClientFlags(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
  const [ack] = await client.option(Opt.STARTTLS)
  if (ack?.type !== Rep.ACK) throw new Error('STARTTLS refused')
  const secure = tls.connect({
    socket: client.socket,
    ca: await fs.readFile(caFile),
    servername: 'localhost',
  })
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', resolve)
    secure.once('error', reject)
  })
  return secure
}

/** The serial of the certificate the NBD server presents after STARTTLS, as a client sees it. */
async function nbdCertificateSerial(address: string, caFile: string): Promise<string> {
  const session = await startTlsSession(address, caFile)
  try {
    return session.getPeerCertificate().serialNumber
  } finally {
    session.destroy()
  }
}

t.test(
  'a replaced NBD certificate serves new clients after SIGHUP, without a restart',
  { skip: skip ?? false },
  async (t) => {
    const dir = await tempDir('duplex-nbd-rotate-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const ca = path.join(dir, 'ca')
    t.equal((await duplex(['cert', 'ca', '--dir', ca])).code, 0)
    const issue = async (out: string): Promise<{ cert: string; key: string }> => {
      const issued = await duplex([
        ...['cert', 'issue', 'n1', '--ca-dir', ca, '--out', path.join(dir, out)],
        ...['--kind', 'server', '--ip', '127.0.0.1', '--dns', 'localhost'],
      ])
      t.equal(issued.code, 0, issued.stderr)
      return {
        cert: path.join(dir, out, 'n1-cert.pem'),
        key: path.join(dir, out, 'n1-key.pem'),
      }
    }
    const first = await issue('first')
    const second = await issue('second')
    const live = { cert: path.join(dir, 'live-cert.pem'), key: path.join(dir, 'live-key.pem') }
    await fs.copyFile(first.cert, live.cert)
    await fs.copyFile(first.key, live.key)
    const caFile = path.join(ca, 'ca-cert.pem')
    const { daemon, address } = await startTlsNode(t, path.join(dir, 'node'), [
      ...['--tls-cert', live.cert, '--tls-key', live.key, '--tls-required'],
    ])
    const serialOf = async (file: string): Promise<string> =>
      new X509Certificate(await fs.readFile(file)).serialNumber
    t.equal(await nbdCertificateSerial(address, caFile), await serialOf(first.cert))

    // A client attached before the rotation keeps its session.
    const attached = await startTlsSession(address, caFile)
    t.teardown(() => {
      attached.destroy()
    })
    for (const [from, to] of [
      [second.key, live.key],
      [second.cert, live.cert],
    ] as const) {
      await fs.copyFile(from, `${to}.new`)
      await fs.rename(`${to}.new`, to)
    }
    daemon.child.kill('SIGHUP')
    const expected = await serialOf(second.cert)
    await until('the node installs its new certificate', () =>
      Promise.resolve(/installed a new TLS certificate/.test(daemon.stderr()) ? true : undefined),
    )
    t.equal(
      await nbdCertificateSerial(address, caFile),
      expected,
      'a new connection gets the new certificate',
    )
    t.match(daemon.stderr(), /installed a new TLS certificate/)
    t.ok(
      !attached.destroyed && attached.readyState === 'open',
      'the session opened before is still up',
    )
    const io = await run('qemu-io', [
      ...['--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${path.dirname(caFile)}`],
      ...['--image-opts', '-c', 'write -P 0x6e 0 1M', '-c', 'read -P 0x6e 0 1M'],
      `driver=nbd,host=${address.split(':')[0] ?? ''},port=${address.split(':')[1] ?? ''},export=v,tls-creds=tls0`,
    ])
    t.equal(io.code, 0, `qemu-io over TLS with the new certificate: ${io.stderr}`)
  },
)
