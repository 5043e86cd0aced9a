/**
 * `duplex cert`: a cluster CA and the certificates issued from it, made with the openssl command
 * (Debian's `openssl` package) so that nothing here implements cryptography. EC P-256 keys,
 * written with mode 0600; the CA key should then live offline.
 *
 *   duplex cert ca --dir DIR                          # DIR/ca-cert.pem, DIR/ca-key.pem
 *   duplex cert issue a1 --ca-dir DIR --out OUT --kind node --ip 10.0.1.11 --dns a1.example.org
 *   duplex cert issue w --ca-dir DIR --out OUT --kind witness --ip 10.0.3.10
 *   duplex cert issue alice --ca-dir DIR --out OUT --kind admin
 *   duplex cert issue hv-a1 --ca-dir DIR --out OUT --kind client
 *
 * A certificate's common name is NAME and its OU the role (duplex-node, duplex-witness,
 * duplex-admin, duplex-client, duplex-server; see src/core/tls.ts). `issue` writes
 * OUT/NAME-cert.pem and OUT/NAME-key.pem, and the directory the holder is given:
 * - node, witness, admin: OUT/NAME/ with ca-cert.pem, cert.pem and key.pem, for `--credentials`;
 * - client: OUT/NAME/ with ca-cert.pem, client-cert.pem and client-key.pem, the directory QEMU's
 *   `tls-creds-x509` and libnbd's `tls-certificates` read.
 * Certificates of nodes, witnesses and NBD-only servers must name where they are reached (--ip,
 * --dns): clients check the address they dial against them.
 */
import { execFile } from 'node:child_process'
import { chmod, copyFile, mkdir, rm, writeFile } from 'node:fs/promises'
import { isIP } from 'node:net'
import path from 'node:path'
import { promisify } from 'node:util'
import { DuplexError, errorMessage } from '../core/errors.js'
import { credentialFiles, roleUnit } from '../core/tls.js'

const exec = promisify(execFile)

async function openssl(args: string[]): Promise<void> {
  try {
    await exec('openssl', args)
  } catch (error) {
    const stderr = (error as { stderr?: string }).stderr ?? ''
    if ((error as { code?: unknown }).code === 'ENOENT') {
      throw new DuplexError(
        'UNAVAILABLE',
        'duplex cert needs the openssl command: apt-get install openssl',
      )
    }
    throw new DuplexError('IO_ERROR', `openssl failed: ${stderr.trim() || errorMessage(error)}`)
  }
}

const keyArgs = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes']

/** Where `duplex cert` reports what it wrote (stdout; the demo passes a quiet one). */
export type Say = (line: string) => void

const toStdout: Say = (line) => process.stdout.write(`${line}\n`)

export async function makeCa(
  dir: string,
  name: string,
  days: number,
  say: Say = toStdout,
): Promise<void> {
  await mkdir(dir, { recursive: true })
  const cert = path.join(dir, 'ca-cert.pem')
  const key = path.join(dir, 'ca-key.pem')
  await openssl([
    ...['req', '-x509', ...keyArgs, '-keyout', key, '-out', cert, '-days', String(days)],
    ...['-subj', `/CN=${name}`, '-addext', 'basicConstraints=critical,CA:TRUE'],
    ...['-addext', 'keyUsage=critical,keyCertSign,cRLSign'],
  ])
  await chmod(key, 0o600)
  say(`CA ${name}: ${cert} (keep ${key} offline)`)
}

export const certKinds = ['node', 'witness', 'admin', 'client', 'server'] as const
export type CertKind = (typeof certKinds)[number]

/** Extended key usages per kind: servers serve, everyone but a pure server is a client. */
const usages: Record<CertKind, string> = {
  node: 'serverAuth,clientAuth',
  witness: 'serverAuth,clientAuth',
  admin: 'clientAuth',
  client: 'clientAuth',
  server: 'serverAuth',
}

export interface IssueOptions {
  caDir: string
  out: string
  kind: CertKind
  ips: string[]
  dnsNames: string[]
  days: number
}

export async function issueCert(
  name: string,
  options: IssueOptions,
  say: Say = toStdout,
): Promise<void> {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `certificate name ${JSON.stringify(name)}: use 1-64 letters, digits, '.', '_' and '-'`,
    )
  }
  for (const ip of options.ips) {
    if (isIP(ip) === 0) throw new DuplexError('INVALID_ARGUMENT', `--ip ${ip} is not an IP address`)
  }
  for (const dns of options.dnsNames) {
    if (!/^[A-Za-z0-9*.-]{1,253}$/.test(dns)) {
      throw new DuplexError('INVALID_ARGUMENT', `--dns ${dns} is not a host name`)
    }
  }
  const serves = usages[options.kind].includes('serverAuth')
  if (serves && options.ips.length + options.dnsNames.length === 0) {
    throw new DuplexError(
      'INVALID_ARGUMENT',
      `a ${options.kind} certificate names where clients reach it: give --ip and/or --dns`,
    )
  }
  const caCert = path.join(options.caDir, 'ca-cert.pem')
  const caKey = path.join(options.caDir, 'ca-key.pem')
  await mkdir(options.out, { recursive: true })
  const cert = path.join(options.out, `${name}-cert.pem`)
  const key = path.join(options.out, `${name}-key.pem`)
  const csr = path.join(options.out, `${name}.csr`)
  const ext = path.join(options.out, `${name}.ext`)
  const san = [...options.ips.map((ip) => `IP:${ip}`), ...options.dnsNames.map((d) => `DNS:${d}`)]
  await writeFile(
    ext,
    [
      `extendedKeyUsage=${usages[options.kind]}`,
      'keyUsage=digitalSignature',
      ...(san.length > 0 ? [`subjectAltName=${san.join(',')}`] : []),
      '',
    ].join('\n'),
  )
  try {
    const subject = `/CN=${name}/OU=${roleUnit(options.kind)}`
    await openssl(['req', ...keyArgs, '-keyout', key, '-out', csr, '-subj', subject])
    await chmod(key, 0o600)
    await openssl([
      ...['x509', '-req', '-in', csr, '-CA', caCert, '-CAkey', caKey, '-CAcreateserial'],
      ...['-out', cert, '-days', String(options.days), '-extfile', ext],
    ])
  } finally {
    await rm(csr, { force: true })
    await rm(ext, { force: true })
  }
  say(`${options.kind} certificate ${name}: ${cert}, key ${key}`)
  if (options.kind === 'node' || options.kind === 'witness' || options.kind === 'admin') {
    const dir = path.join(options.out, name)
    await mkdir(dir, { recursive: true })
    const files = credentialFiles(dir)
    await copyFile(caCert, files.ca)
    await copyFile(cert, files.cert)
    await copyFile(key, files.key)
    await chmod(files.key, 0o600)
    say(`credentials directory (--credentials): ${dir}`)
  }
  if (options.kind === 'client') {
    const dir = path.join(options.out, name)
    await mkdir(dir, { recursive: true })
    await copyFile(caCert, path.join(dir, 'ca-cert.pem'))
    await copyFile(cert, path.join(dir, 'client-cert.pem'))
    await copyFile(key, path.join(dir, 'client-key.pem'))
    await chmod(path.join(dir, 'client-key.pem'), 0o600)
    say(`client directory for qemu (tls-creds-x509 dir=) and nbdinfo: ${dir}`)
  }
}
