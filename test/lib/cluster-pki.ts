/**
 * Test helper: a cluster's certificates made with `duplex cert` itself (so the command is
 * exercised too): CAs, and credential directories (ca-cert.pem, cert.pem, key.pem) for nodes,
 * witnesses and admins, plus openssl for what `duplex cert` refuses to make (an expired one).
 */
import fs from 'node:fs/promises'
import path from 'node:path'
import type { Test } from 'tap'
import { duplex, run, tempDir } from './node-process.js'

export type Kind = 'node' | 'witness' | 'admin' | 'client' | 'server'

export class ClusterPki {
  constructor(readonly dir: string) {}

  /** A PKI in a fresh temporary directory that `t`'s teardown removes. */
  static async temporary(t: Test, prefix: string): Promise<ClusterPki> {
    const dir = await tempDir(prefix)
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    return new ClusterPki(dir)
  }

  caDir(ca: string): string {
    return path.join(this.dir, ca)
  }

  async makeCa(ca: string): Promise<void> {
    const made = await duplex(['cert', 'ca', '--dir', this.caDir(ca), '--name', ca])
    if (made.code !== 0) throw new Error(`duplex cert ca: ${made.stderr}`)
  }

  /**
   * Issues NAME from `ca` and returns its credentials directory. `out` keeps several
   * generations of one name apart (rotation).
   */
  async issue(ca: string, name: string, kind: Kind, out = `issued-${ca}`): Promise<string> {
    const address =
      kind === 'node' || kind === 'witness' || kind === 'server' ? ['--ip', '127.0.0.1'] : []
    const outDir = path.join(this.dir, out)
    const issued = await duplex([
      ...['cert', 'issue', name, '--ca-dir', this.caDir(ca), '--out', outDir, '--kind', kind],
      ...address,
    ])
    if (issued.code !== 0) throw new Error(`duplex cert issue ${name}: ${issued.stderr}`)
    return path.join(outDir, name)
  }

  /** A credentials directory whose certificate expired yesterday (openssl: duplex cert will not). */
  async issueExpired(ca: string, name: string, kind: Kind): Promise<string> {
    const dir = path.join(this.dir, `expired-${name}`)
    await fs.mkdir(dir, { recursive: true })
    const key = path.join(dir, 'key.pem')
    const csr = path.join(dir, 'req.csr')
    const openssl = async (args: string[]): Promise<void> => {
      const result = await run('openssl', args)
      if (result.code !== 0) throw new Error(`openssl ${args.join(' ')}: ${result.stderr}`)
    }
    await openssl([
      ...['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'],
      ...['-keyout', key, '-out', csr, '-subj', `/CN=${name}/OU=duplex-${kind}`],
    ])
    await openssl([
      ...['x509', '-req', '-in', csr, '-CA', path.join(this.caDir(ca), 'ca-cert.pem')],
      ...['-CAkey', path.join(this.caDir(ca), 'ca-key.pem'), '-CAcreateserial'],
      ...['-out', path.join(dir, 'cert.pem'), '-days', '-1'],
    ])
    await fs.copyFile(path.join(this.caDir(ca), 'ca-cert.pem'), path.join(dir, 'ca-cert.pem'))
    return dir
  }

  /** The PEM of CA `ca`'s certificate. */
  caCert(ca: string): Promise<string> {
    return fs.readFile(path.join(this.caDir(ca), 'ca-cert.pem'), 'utf8')
  }
}

/**
 * Replaces the files of credentials directory `to` with those of `from` (and `caBundle` as
 * ca-cert.pem, if given), each by an atomic rename, as an operator's deploy tool would.
 */
export async function installCredentials(
  from: string,
  to: string,
  caBundle?: string,
): Promise<void> {
  const put = async (name: string, content: Buffer | string): Promise<void> => {
    const temporary = path.join(to, `.${name}.new`)
    await fs.writeFile(temporary, content, { mode: 0o600 })
    await fs.rename(temporary, path.join(to, name))
  }
  await put('key.pem', await fs.readFile(path.join(from, 'key.pem')))
  await put('cert.pem', await fs.readFile(path.join(from, 'cert.pem')))
  await put('ca-cert.pem', caBundle ?? (await fs.readFile(path.join(from, 'ca-cert.pem'))))
}
