/**
 * Test helper: throwaway x509 material made with the openssl CLI. `makePki(dir)` writes a CA, a
 * server certificate for 127.0.0.1 and localhost, and client certificates, in the directory
 * layout QEMU's tls-creds-x509 and libnbd read (ca-cert.pem, client-cert.pem, client-key.pem),
 * plus a second CA with its own client certificate (one the first CA never signed).
 */
import fs from 'node:fs/promises'
import path from 'node:path'
import { run } from './node-process.js'

export interface Pki {
  /** The CA, the server's certificate and key (what a node is given). */
  caCert: string
  serverCert: string
  serverKey: string
  /** Client directories for qemu (`tls-creds-x509,dir=...`) and libnbd (`tls-certificates=`). */
  clientDir: string
  /** A client whose certificate another CA signed (it trusts our CA, we do not trust it). */
  strangerDir: string
  /** No client certificate at all, only the CA to check the server. */
  anonymousDir: string
  /** A second client of our CA, common name `other-client`. */
  otherClientDir: string
}

async function openssl(args: string[]): Promise<void> {
  const result = await run('openssl', args)
  if (result.code !== 0) throw new Error(`openssl ${args.join(' ')}: ${result.stderr}`)
}

async function makeCa(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const cert = path.join(dir, `${name}.pem`)
  const key = path.join(dir, `${name}-key.pem`)
  await openssl([
    ...['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'],
    ...['-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name}`],
    ...[
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    ],
  ])
  return { cert, key }
}

async function issue(
  dir: string,
  name: string,
  ca: { cert: string; key: string },
  extensions: string,
): Promise<{ cert: string; key: string }> {
  const key = path.join(dir, `${name}-key.pem`)
  const csr = path.join(dir, `${name}.csr`)
  const cert = path.join(dir, `${name}-cert.pem`)
  const ext = path.join(dir, `${name}.ext`)
  await fs.writeFile(ext, extensions)
  await openssl([
    ...['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'],
    ...['-keyout', key, '-out', csr, '-subj', `/CN=${name}`],
  ])
  await openssl([
    ...['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial'],
    ...['-out', cert, '-days', '2', '-extfile', ext],
  ])
  return { cert, key }
}

async function clientDir(
  dir: string,
  ca: string,
  client?: { cert: string; key: string },
): Promise<string> {
  await fs.mkdir(dir, { recursive: true })
  await fs.copyFile(ca, path.join(dir, 'ca-cert.pem'))
  if (client !== undefined) {
    await fs.copyFile(client.cert, path.join(dir, 'client-cert.pem'))
    await fs.copyFile(client.key, path.join(dir, 'client-key.pem'))
  }
  return dir
}

export async function makePki(dir: string): Promise<Pki> {
  await fs.mkdir(dir, { recursive: true })
  const ca = await makeCa(dir, 'duplex-test-ca')
  const other = await makeCa(dir, 'other-ca')
  const server = await issue(
    dir,
    'server',
    ca,
    'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n',
  )
  const client = await issue(
    dir,
    'client',
    ca,
    'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n',
  )
  const otherClient = await issue(
    dir,
    'other-client',
    ca,
    'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n',
  )
  const stranger = await issue(
    dir,
    'stranger',
    other,
    'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n',
  )
  return {
    caCert: ca.cert,
    serverCert: server.cert,
    serverKey: server.key,
    clientDir: await clientDir(path.join(dir, 'client'), ca.cert, client),
    strangerDir: await clientDir(path.join(dir, 'stranger'), ca.cert, stranger),
    anonymousDir: await clientDir(path.join(dir, 'anonymous'), ca.cert),
    otherClientDir: await clientDir(path.join(dir, 'other-client'), ca.cert, otherClient),
  }
}
