/**
 * src/core/tls.ts and src/core/authorization.ts: identities from certificate subjects, the
 * checks of a process's own files (each failure says what is wrong), reloading replaced files
 * (a half-replaced set is refused and the current one kept), and the authorization rules.
 * Certificates come from `duplex cert` (test/lib/cluster-pki.ts).
 */
import fs from 'node:fs/promises'
import path from 'node:path'
import t from 'tap'
import { denied, requireNode, requireRole } from '../../src/core/authorization.js'
import { isDuplexError } from '../../src/core/errors.js'
import { createLogger } from '../../src/core/log.js'
import {
  credentialFiles,
  identityOfSubject,
  identityProblem,
  loadTlsFiles,
  TlsCredentials,
} from '../../src/core/tls.js'
import type { Caller } from '../../src/core/unary-rpc.js'
import { ClusterPki, installCredentials } from '../lib/cluster-pki.js'
import { missingTools } from '../lib/node-process.js'

const skip = await missingTools(['openssl'])

t.test('identities from certificate subjects', async (t) => {
  t.same(identityOfSubject({ CN: 'a1', OU: 'duplex-node' }), { name: 'a1', role: 'node' })
  t.same(identityOfSubject({ CN: ['w', 'x'], OU: ['ops', 'duplex-witness'] }), {
    name: 'w',
    role: 'witness',
  })
  t.same(identityOfSubject({ CN: 'hv1' }), { name: 'hv1', role: undefined }, 'no duplex role')
  t.equal(identityOfSubject({ OU: 'duplex-admin' }), undefined, 'no common name')
  t.equal(identityOfSubject(undefined), undefined)
  t.equal(identityProblem({ name: 'a1', role: 'node' }, { role: 'node', name: 'a1' }), undefined)
  t.equal(identityProblem({ name: 'a1', role: 'node' }, { role: 'node' }), undefined)
  t.match(
    identityProblem({ name: 'a1', role: 'node' }, { role: 'node', name: 'b1' }),
    /names a1, not b1/,
  )
  t.match(
    identityProblem({ name: 'alice', role: 'admin' }, { role: 'witness' }),
    /alice's certificate is a duplex-admin certificate, where a duplex-witness/,
  )
  t.match(identityProblem({ name: 'x', role: undefined }, { role: 'node' }), /has no duplex role/)
  t.match(identityProblem(undefined, { role: 'node' }), /no common name/)
})

t.test('authorization rules name the caller and the reason', async (t) => {
  const caller = (name: string, role?: 'node' | 'admin'): Caller => ({
    address: '10.0.0.9:4000',
    identity: { name, role },
  })
  t.doesNotThrow(() => {
    requireNode(caller('a1', 'node'), 'a1', 'renew a lease')
  })
  const asOther = (() => {
    try {
      requireNode(caller('b2', 'node'), 'a1', 'ask to take over')
    } catch (error) {
      return error
    }
    return undefined
  })()
  t.ok(isDuplexError(asOther, 'PERMISSION_DENIED'))
  t.match(
    String(asOther),
    /b2 \(duplex-node\) at 10.0.0.9:4000 may not ask to take over: the request speaks for a1, the certificate for b2/,
  )
  t.throws(() => {
    requireNode(caller('alice', 'admin'), 'alice', 'x')
  }, /needs a duplex-node/)
  t.throws(() => requireRole(caller('a1', 'node'), ['admin'], 'change'), /needs a duplex-admin/)
  t.throws(
    () => requireRole({ address: 'a', identity: undefined }, ['admin', 'node'], 'read'),
    /a certificate without a common name .* needs a duplex-admin or duplex-node certificate/,
  )
  t.equal(requireRole(caller('a1', 'node'), ['admin', 'node'], 'read').name, 'a1')
  t.match(denied(caller('x'), 'do it', 'why').message, /x \(no duplex role\)/)
})

t.test('a process checks its own files', { skip: skip ?? false }, async (t) => {
  const pki = await ClusterPki.temporary(t, 'duplex-tls-unit-')
  const { dir } = pki
  await pki.makeCa('cluster')
  await pki.makeCa('other')
  const a1 = await pki.issue('cluster', 'a1', 'node')
  const b1 = await pki.issue('cluster', 'b1', 'node')
  const fromOther = await pki.issue('other', 'c1', 'node')
  const expired = await pki.issueExpired('cluster', 'a1', 'node')
  const now = new Date()

  const loaded = loadTlsFiles(credentialFiles(a1), { role: 'node', name: 'a1' }, now)
  t.same(loaded.identity, { name: 'a1', role: 'node' })
  t.ok(loaded.validTo.getTime() > now.getTime(), 'valid now')

  const bundle = path.join(dir, 'bundle.pem')
  await fs.writeFile(bundle, (await pki.caCert('cluster')) + (await pki.caCert('other')))
  const files = credentialFiles(fromOther)
  t.equal(
    loadTlsFiles({ ...files, ca: bundle }, { role: 'node' }, now).identity.name,
    'c1',
    'a CA bundle trusts each of its CAs (a CA rotation)',
  )
  t.same(
    loadTlsFiles({ cert: files.cert, key: files.key }, undefined, now).identity,
    { name: 'c1', role: 'node' },
    'without a CA (an NBD server without client certificates) only the pair is checked',
  )

  const failures: [string, () => unknown, RegExp][] = [
    [
      'expired',
      () => loadTlsFiles(credentialFiles(expired), { role: 'node' }, now),
      /certificate .*cert.pem \(a1 \(duplex-node\)\) expired on \d{4}-\d\d-\d\d .* UTC: issue a new one/,
    ],
    [
      'not yet valid',
      () => loadTlsFiles(credentialFiles(a1), { role: 'node' }, new Date(Date.UTC(2000, 0, 1))),
      /is not valid before .*clock/,
    ],
    [
      'another CA',
      () => loadTlsFiles({ ...files, ca: credentialFiles(a1).ca }, { role: 'node' }, now),
      /was issued by CN=other, not by a CA in/,
    ],
    [
      'a key of another certificate',
      () => loadTlsFiles({ ...credentialFiles(a1), key: credentialFiles(b1).key }, undefined, now),
      /the TLS key .*b1\/key.pem does not belong to the certificate .*a1\/cert.pem/,
    ],
    [
      'the wrong role',
      () => loadTlsFiles(credentialFiles(a1), { role: 'witness' }, now),
      /a duplex-witness certificate is needed \(duplex cert issue NAME --kind witness\)/,
    ],
    [
      'the wrong name',
      () => loadTlsFiles(credentialFiles(a1), { role: 'node', name: 'b1' }, now),
      /names a1, not b1/,
    ],
    [
      'a missing file',
      () => loadTlsFiles(credentialFiles(path.join(dir, 'nope')), undefined, now),
      /cannot read the TLS CA bundle .*nope\/ca-cert.pem: no such file/,
    ],
    [
      'a leaf certificate as the CA',
      () => loadTlsFiles({ ...credentialFiles(a1), ca: credentialFiles(b1).cert }, undefined, now),
      /holds CN=b1, OU=duplex-node, which is not a CA certificate/,
    ],
    [
      'a key as the certificate',
      () => loadTlsFiles({ ...credentialFiles(a1), cert: credentialFiles(a1).key }, undefined, now),
      /holds no PEM certificate/,
    ],
  ]
  for (const [what, load, message] of failures) {
    let error: unknown
    try {
      load()
    } catch (caught) {
      error = caught
    }
    t.ok(isDuplexError(error, 'INVALID_ARGUMENT'), `${what}: refused`)
    t.match(String(error), message, `${what}: says so`)
  }
})

t.test('replaced files are installed only when they pass', { skip: skip ?? false }, async (t) => {
  const pki = await ClusterPki.temporary(t, 'duplex-tls-reload-')
  const { dir } = pki
  await pki.makeCa('cluster')
  const first = await pki.issue('cluster', 'a1', 'node')
  const second = await pki.issue('cluster', 'a1', 'node', 'second')
  const live = path.join(dir, 'live')
  await fs.mkdir(live)
  await installCredentials(first, live)
  const lines: string[] = []
  const installed: string[] = []
  const credentials = new TlsCredentials({
    files: credentialFiles(live),
    self: { role: 'node', name: 'a1' },
    log: createLogger('test', 'info', (line) => lines.push(line)),
    reloadMs: 0,
    onInstalled: (material) => installed.push(material.serial),
  })
  t.teardown(() => {
    credentials.close()
  })
  const firstSerial = credentials.current.serial
  const identities: Buffer[] = []
  credentials.addIdentityCertificateListener((update) => {
    if (update !== null) identities.push(update.certificate)
  })
  await new Promise((resolve) => setImmediate(resolve))
  t.equal(identities.length, 1, 'a new listener gets the current certificate')
  t.equal(credentials.reload(), false, 'unchanged files: nothing to do')

  // Half replaced: the new certificate with the old key.
  await fs.copyFile(path.join(second, 'cert.pem'), path.join(live, 'cert.pem'))
  t.equal(credentials.reload(), false, 'a certificate without its key is not installed')
  t.equal(credentials.current.serial, firstSerial, 'the current set stays')
  t.equal(credentials.reload(true), false, 'and stays on a forced reload')
  t.equal(
    lines.filter((line) => line.includes('not usable; keeping the current certificate')).length,
    1,
    'the problem is logged once',
  )
  t.match(lines.join(''), /does not belong to the certificate/)

  await fs.copyFile(path.join(second, 'key.pem'), path.join(live, 'key.pem'))
  t.equal(credentials.reload(), true, 'the complete pair is installed')
  t.not(credentials.current.serial, firstSerial, 'a new serial')
  t.equal(identities.length, 2, 'gRPC listeners get the new certificate')
  t.same(installed, [firstSerial, credentials.current.serial])
  t.match(lines.join(''), /installed a new TLS certificate name=a1 serial=/)
  t.ok(credentials.secureContext(), 'NBD gets a context')
})

t.test('a certificate that expires in use is reported once', { skip: skip ?? false }, async (t) => {
  const pki = await ClusterPki.temporary(t, 'duplex-tls-expiry-')
  await pki.makeCa('cluster')
  const a1 = await pki.issue('cluster', 'a1', 'node')
  let now = Date.now()
  const lines: string[] = []
  const credentials = new TlsCredentials({
    files: credentialFiles(a1),
    log: createLogger('test', 'info', (line) => lines.push(line)),
    reloadMs: 0,
    clock: () => now,
  })
  t.teardown(() => {
    credentials.close()
  })
  t.equal(credentials.reload(), false)
  t.same(lines, [], 'nothing to say while it is valid')
  now = credentials.current.validTo.getTime() + 1000
  credentials.reload()
  credentials.reload()
  t.equal(lines.length, 1, 'said once')
  t.match(lines[0], /error test: the TLS certificate in use has expired: .* install a new one/)
})
