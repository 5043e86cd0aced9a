/**
 * Test helper: runs `duplex demo` (what `npm start` runs) and waits for its three process lines.
 */
import { spawn } from 'node:child_process'
import readline from 'node:readline'
import { cliPath } from './node-process.js'

export interface Demo {
  firstLine: string
  secondLine: string
  witnessLine: string
  stop(signal: NodeJS.Signals): Promise<number | null>
}

export async function startDemo(dir: string, port: number): Promise<Demo> {
  const child = spawn(process.execPath, [cliPath, 'demo', '--dir', dir, '--port', String(port)], {
    stdio: ['ignore', 'pipe', 'pipe'],
  })
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  const lines = readline.createInterface({ input: child.stdout })
  const received: string[] = []
  const processLines = new Promise<string[]>((resolve) => {
    lines.on('line', (line) => {
      received.push(line)
      if (received.length === 3) resolve(received)
    })
  })
  const [firstLine = '', secondLine = '', witnessLine = ''] = await Promise.race([
    processLines,
    exited.then((code) => {
      throw new Error(`demo exited with ${code ?? 'signal'} before printing:\n${stderr}`)
    }),
  ])
  return {
    firstLine,
    secondLine,
    witnessLine,
    async stop(signal) {
      child.kill(signal)
      return exited
    },
  }
}
