// Express 4, installed under the alias `express4` so that the HTTP contract runs against it
// too. What the tests use of it has the same shape as in Express 5, whose types stand in.
declare module 'express4' {
  import express from 'express';
  export default express;
}
