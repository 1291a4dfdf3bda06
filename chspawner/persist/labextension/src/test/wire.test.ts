// Unit tests of wire.ts under plain Node (npm test): frames built here as
// jupyter_server builds them.
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { parseChannelsUrl, readSeq, V1_PROTOCOL, withReceived } from '../wire';
import { message, v1Frame } from './frames';

/** The legacy protocol's binary frame (serialize_binary_message). */
function legacyBinary(msg: any, buffers: Uint8Array[]): ArrayBuffer {
  const parts = [new TextEncoder().encode(JSON.stringify(msg)), ...buffers];
  const offsets = [4 * (parts.length + 1)];
  for (const part of parts.slice(0, -1)) {
    offsets.push(offsets[offsets.length - 1] + part.length);
  }
  const total = offsets[offsets.length - 1] + parts[parts.length - 1].length;
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  view.setUint32(0, parts.length);
  offsets.forEach((o, i) => view.setUint32(4 * (i + 1), o));
  parts.forEach((part, i) => out.set(part, offsets[i]));
  return out.buffer;
}

test('kernel channels URLs are recognised with their kernel and session', () => {
  assert.deepEqual(
    parseChannelsUrl('ws://h/user/u/api/kernels/k-1/channels?session_id=s%201&token=t'),
    { kernelId: 'k-1', sessionId: 's 1' }
  );
  assert.deepEqual(parseChannelsUrl('wss://h/api/kernels/k/channels'), {
    kernelId: 'k',
    sessionId: ''
  });
  assert.equal(parseChannelsUrl('ws://h/api/events/subscribe'), null);
  assert.equal(parseChannelsUrl('ws://h/terminals/websocket/1'), null);
  assert.equal(parseChannelsUrl('ws://h/api/kernels/k/channelsX?session_id=s'), null);
});

test('chspawner_received is added, or replaced, leaving the other arguments as they were', () => {
  assert.equal(
    withReceived('ws://h/api/kernels/k/channels?session_id=s&token=a%2Fb', 42),
    'ws://h/api/kernels/k/channels?session_id=s&token=a%2Fb&chspawner_received=42'
  );
  assert.equal(
    withReceived('ws://h/api/kernels/k/channels?chspawner_received=1&session_id=s', 7),
    'ws://h/api/kernels/k/channels?session_id=s&chspawner_received=7'
  );
  assert.equal(withReceived('ws://h/api/kernels/k/channels', 0),
               'ws://h/api/kernels/k/channels?chspawner_received=0');
});

test('the seq is read from v1 frames, buffers or not', () => {
  assert.deepEqual(readSeq(v1Frame(message(1700000000000001)), V1_PROTOCOL), {
    channel: 'iopub',
    seq: 1700000000000001
  });
  const withBuffers = v1Frame(message(5), [new Uint8Array([1, 2, 3]), new Uint8Array(10)]);
  assert.deepEqual(readSeq(withBuffers, V1_PROTOCOL), { channel: 'iopub', seq: 5 });
  assert.deepEqual(readSeq(v1Frame(message(null, 'shell')), V1_PROTOCOL), {
    channel: 'shell',
    seq: null
  });
  // A typed array view onto a larger buffer reads the same.
  const frame = new Uint8Array(v1Frame(message(9)));
  const padded = new Uint8Array(frame.length + 8);
  padded.set(frame, 8);
  assert.deepEqual(readSeq(padded.subarray(8), V1_PROTOCOL), { channel: 'iopub', seq: 9 });
});

test('the seq is read from the legacy JSON protocol, text or binary', () => {
  assert.deepEqual(readSeq(JSON.stringify(message(3)), ''), { channel: 'iopub', seq: 3 });
  assert.deepEqual(readSeq(legacyBinary(message(4), [new Uint8Array([9, 9])]), ''), {
    channel: 'iopub',
    seq: 4
  });
});

test('a seq only counts as a whole, non-negative number', () => {
  for (const bad of ['5', -1, 1.5, null, Number.MAX_VALUE]) {
    const msg = message(1);
    msg.metadata.chspawner_seq = bad;
    assert.equal(readSeq(JSON.stringify(msg), '')!.seq, null, String(bad));
  }
  // Text that merely mentions the key, in the content, is no seq.
  const msg = message(null);
  msg.content.text = '"chspawner_seq": 12';
  assert.equal(readSeq(JSON.stringify(msg), '')!.seq, null);
});

test('frames that cannot be read are left to JupyterLab', () => {
  assert.equal(readSeq('not json', ''), null);
  assert.equal(readSeq(new Uint8Array([1, 0, 0]).buffer, V1_PROTOCOL), null);
  assert.equal(readSeq(new ArrayBuffer(16), V1_PROTOCOL), null);
  assert.equal(readSeq(42, V1_PROTOCOL), null);
});
