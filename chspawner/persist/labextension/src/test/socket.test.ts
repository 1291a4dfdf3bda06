// Unit tests of socket.ts: the wrapper around a stand-in for the browser's
// WebSocket (an onmessage accessor and message listeners, as the DOM's).
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { persistingWebSocket, ReceivedStore } from '../socket';
import { V1_PROTOCOL } from '../wire';
import { message, v1Frame } from './frames';

class FakeSocket {
  static made: FakeSocket[] = [];
  protocol = V1_PROTOCOL;
  private _onmessage: ((ev: any) => void) | null = null;
  private _listeners: Array<(ev: any) => void> = [];
  constructor(public url: string, public protocols?: string | string[]) {
    FakeSocket.made.push(this);
  }
  get onmessage(): ((ev: any) => void) | null {
    return this._onmessage;
  }
  set onmessage(value: ((ev: any) => void) | null) {
    this._onmessage = value;
  }
  addEventListener(type: string, listener: any): void {
    if (type === 'message') this._listeners.push(listener);
  }
  removeEventListener(type: string, listener: any): void {
    this._listeners = this._listeners.filter(l => l !== listener);
  }
  /** The browser delivering one frame. */
  deliver(data: any): void {
    const ev = { data };
    this._onmessage?.call(this, ev);
    this._listeners.forEach(l => l(ev));
  }
}

/** A socket whose onmessage setter adds a message listener, as Playwright's mock does. */
class ListeningSocket extends FakeSocket {
  private _handler: ((ev: any) => void) | null = null;
  get onmessage(): ((ev: any) => void) | null {
    return this._handler;
  }
  set onmessage(value: ((ev: any) => void) | null) {
    if (this._handler) this.removeEventListener('message', this._handler);
    this._handler = value;
    if (value) this.addEventListener('message', value);
  }
}

const URL_S1 = 'ws://h/api/kernels/k1/channels?session_id=s1';

function setup(seed: (k: string) => number | null = () => null, Base: any = FakeSocket) {
  FakeSocket.made = [];
  const store = new ReceivedStore(seed);
  const Ws = persistingWebSocket(Base, store);
  return { store, Ws };
}

function texts(frames: any[]): string[] {
  return frames.map(ev => {
    const view = new DataView(ev.data);
    const count = Number(view.getBigUint64(0, true));
    const at = (i: number) => Number(view.getBigUint64(8 * (i + 1), true));
    const json = new TextDecoder().decode(new Uint8Array(ev.data, at(4), at(5) - at(4)));
    return count && JSON.parse(json).text;
  });
}

test('copies are dropped, new messages and messages without a seq go through', () => {
  const { Ws } = setup();
  const ws = new Ws(URL_S1, [V1_PROTOCOL]) as any;
  const got: any[] = [];
  ws.onmessage = (ev: any) => got.push(ev);
  assert.equal(ws.onmessage !== null, true);
  const fake = FakeSocket.made[0];
  assert.equal(fake.url, URL_S1); // a first connection with nothing known: as JupyterLab made it
  for (const seq of [10, 11, 11, 10, 12]) fake.deliver(v1Frame(message(seq)));
  fake.deliver(v1Frame(message(null))); // a notice: no seq
  fake.deliver(v1Frame(message(null, 'shell')));
  assert.deepEqual(texts(got), ['10\n', '11\n', '12\n', 'null\n', 'null\n']);
});

test('a reconnect of the session asks for what follows what it received', () => {
  const { Ws, store } = setup();
  const first = new Ws(URL_S1) as any;
  first.onmessage = () => undefined;
  FakeSocket.made[0].deliver(v1Frame(message(7)));
  FakeSocket.made[0].deliver(v1Frame(message(8)));
  new Ws(URL_S1);
  assert.equal(FakeSocket.made[1].url, `${URL_S1}&chspawner_received=8`);
  // Another session of the same kernel (another notebook's connection) knows nothing.
  new Ws('ws://h/api/kernels/k1/channels?session_id=s2');
  assert.equal(FakeSocket.made[2].url, 'ws://h/api/kernels/k1/channels?session_id=s2');
  // The replay's copies are dropped on the new socket too.
  const second = new Ws(URL_S1) as any;
  const got: any[] = [];
  second.onmessage = (ev: any) => got.push(ev);
  for (const seq of [8, 9]) FakeSocket.made[3].deliver(v1Frame(message(seq)));
  assert.deepEqual(texts(got), ['9\n']);
  assert.equal(store.dropped, 1);
});

test("a new page's first connection asks from the notebook's record", () => {
  const { Ws } = setup(k => (k === 'k1' ? 100 : null));
  const ws = new Ws(URL_S1) as any;
  assert.equal(FakeSocket.made[0].url, `${URL_S1}&chspawner_received=100`);
  const got: any[] = [];
  ws.onmessage = (ev: any) => got.push(ev);
  for (const seq of [99, 100, 101]) FakeSocket.made[0].deliver(v1Frame(message(seq)));
  assert.deepEqual(texts(got), ['101\n']);
  new Ws('ws://h/api/kernels/k2/channels?session_id=s1');
  assert.equal(FakeSocket.made[1].url, 'ws://h/api/kernels/k2/channels?session_id=s1');
});

test('message listeners are filtered as onmessage is; other URLs are left alone', () => {
  const { Ws } = setup();
  const ws = new Ws(URL_S1) as any;
  const got: any[] = [];
  const listener = (ev: any) => got.push(ev);
  ws.addEventListener('message', listener);
  FakeSocket.made[0].deliver(v1Frame(message(1)));
  FakeSocket.made[0].deliver(v1Frame(message(1)));
  ws.removeEventListener('message', listener);
  FakeSocket.made[0].deliver(v1Frame(message(2)));
  assert.equal(got.length, 1);

  const other = new Ws('ws://h/api/events/subscribe') as any;
  const seen: any[] = [];
  other.onmessage = (ev: any) => seen.push(ev);
  FakeSocket.made[1].deliver(v1Frame(message(1)));
  FakeSocket.made[1].deliver(v1Frame(message(1)));
  assert.equal(seen.length, 2);
});

test('a base whose onmessage setter adds a listener filters each message once', () => {
  const { Ws } = setup(undefined, ListeningSocket);
  const ws = new Ws(URL_S1) as any;
  const got: any[] = [];
  ws.onmessage = (ev: any) => got.push(ev);
  for (const seq of [1, 2, 2, 3]) FakeSocket.made[0].deliver(v1Frame(message(seq)));
  assert.deepEqual(texts(got), ['1\n', '2\n', '3\n']);
  ws.onmessage = null;
  FakeSocket.made[0].deliver(v1Frame(message(4)));
  assert.equal(got.length, 3);
});
