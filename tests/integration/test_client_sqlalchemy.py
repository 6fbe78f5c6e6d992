"""SQLAlchemy 2 ORM sessions through the proxy, with the psycopg and the asyncpg drivers.

Both drivers use named prepared statements (psycopg after 5 runs, asyncpg
always), over more ORM sessions than the proxy has server connections.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import ForeignKey, String, create_engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

pytestmark = pytest.mark.timeout(90)


def make_models(prefix: str):
    class Base(DeclarativeBase):
        pass

    class Author(Base):
        __tablename__ = f"{prefix}_author"
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(String(50), unique=True)
        books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")

    class Book(Base):
        __tablename__ = f"{prefix}_book"
        id: Mapped[int] = mapped_column(primary_key=True)
        title: Mapped[str] = mapped_column(String(100))
        pages: Mapped[int]
        author_id: Mapped[int] = mapped_column(ForeignKey(f"{prefix}_author.id"))
        author: Mapped[Author] = relationship(back_populates="books")

    return Base, Author, Book


@pytest.fixture
def prefix(pg):
    name = f"sa_{uuid.uuid4().hex[:8]}"
    yield name
    pg.psql(f"DROP TABLE IF EXISTS {name}_book, {name}_author")


def url(proxy, driver: str, agent: str) -> str:
    return proxy.dsn(agent).replace("postgresql://", f"postgresql+{driver}://", 1)


def test_orm_session_with_psycopg(start_proxy, pg, prefix) -> None:
    proxy = start_proxy(pool_size=2)
    Base, Author, Book = make_models(prefix)
    engine = create_engine(
        url(proxy, "psycopg", "sa-psycopg"), pool_size=4, connect_args={"connect_timeout": 10}
    )
    try:
        Base.metadata.create_all(engine)
        assert (
            pg.psql(
                f"SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE tablename LIKE '{prefix}%'"
            )
            == f"{prefix}_author,{prefix}_book"
        )

        with Session(engine) as s, s.begin():
            for a in range(3):
                s.add(
                    Author(
                        name=f"author {a}",
                        books=[Book(title=f"book {a}.{b}", pages=100 + b) for b in range(4)],
                    )
                )
        assert pg.psql(f"SELECT count(*) FROM {prefix}_book") == "12"

        # several sessions at once (more than the proxy's two servers), each querying repeatedly
        sessions = [Session(engine) for _ in range(4)]
        try:
            for n in range(8):
                for s in sessions:
                    got = s.scalars(
                        select(Book.title)
                        .join(Author)
                        .where(Author.name == f"author {n % 3}")
                        .order_by(Book.id)
                    ).all()
                    assert got == [f"book {n % 3}.{b}" for b in range(4)]
                    s.commit()
        finally:
            for s in sessions:
                s.close()

        with Session(engine) as s:
            author = s.scalars(select(Author).where(Author.name == "author 1")).one()
            assert [b.pages for b in author.books] == [100, 101, 102, 103]  # lazy load
            author.name = "renamed"
            s.execute(
                update(Book).where(Book.author_id == author.id).values(pages=Book.pages + 1000)
            )
            s.commit()
            assert [b.pages for b in author.books] == [1100, 1101, 1102, 1103]
        assert (
            pg.psql(f"SELECT name FROM {prefix}_author ORDER BY id")
            == "author 0\nrenamed\nauthor 2"
        )
        assert pg.psql(f"SELECT sum(pages) FROM {prefix}_book") == str(3 * 406 + 4000)

        with Session(engine) as s:
            s.add(Author(name="never"))
            s.flush()  # in the transaction, on its server
            assert s.scalar(select(func.count()).select_from(Author)) == 4
            s.rollback()
            assert s.scalar(select(func.count()).select_from(Author)) == 3
            s.add(Author(name="author 0"))
            with pytest.raises(IntegrityError):
                s.commit()
            s.rollback()
            s.add(Author(name="late"))
            s.commit()
        assert pg.psql(f"SELECT string_agg(name, ',' ORDER BY id) FROM {prefix}_author") == (
            "author 0,renamed,author 2,late"
        )
        Base.metadata.drop_all(engine)
        assert pg.psql(f"SELECT count(*) FROM pg_tables WHERE tablename LIKE '{prefix}%'") == "0"
    finally:
        engine.dispose()


async def test_orm_async_session_with_asyncpg(start_proxy, pg, prefix) -> None:
    # needs greenlet (the sqlalchemy[asyncio] extra); imported here so the sync test runs without it
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    proxy = start_proxy(pool_size=2)
    Base, Author, Book = make_models(prefix)
    engine = create_async_engine(
        url(proxy, "asyncpg", "sa-asyncpg"), pool_size=5, connect_args={"timeout": 10}
    )
    try:
        async with asyncio.timeout(60):
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.create_all)
            assert (
                pg.psql(f"SELECT count(*) FROM pg_tables WHERE tablename LIKE '{prefix}%'") == "2"
            )

            async with AsyncSession(engine) as s, s.begin():
                s.add_all(
                    Author(
                        name=f"author {a}",
                        books=[Book(title=f"book {a}.{b}", pages=10 * a + b) for b in range(5)],
                    )
                    for a in range(4)
                )
            assert (
                pg.psql(f"SELECT count(*), sum(pages) FROM {prefix}_book")
                == f"20|{sum(10 * a + b for a in range(4) for b in range(5))}"
            )

            async def reader(k: int) -> list[list[str]]:
                out = []
                async with AsyncSession(engine) as s:
                    for n in range(6):
                        rows = await s.scalars(
                            select(Book.title)
                            .join(Author)
                            .where(Author.name == f"author {(k + n) % 4}")
                            .order_by(Book.id)
                        )
                        out.append(list(rows))
                        await s.commit()
                return out

            results = await asyncio.gather(*(reader(k) for k in range(5)))
            for k, out in enumerate(results):
                assert out == [[f"book {(k + n) % 4}.{b}" for b in range(5)] for n in range(6)]

            async with AsyncSession(engine, expire_on_commit=False) as s:
                author = (await s.scalars(select(Author).where(Author.name == "author 2"))).one()
                await s.execute(
                    update(Book).where(Book.author_id == author.id).values(pages=Book.pages * 2)
                )
                author.name = "author two"
                await s.commit()
                pages = (
                    await s.scalars(
                        select(Book.pages).where(Book.author_id == author.id).order_by(Book.id)
                    )
                ).all()
            assert pages == [40, 42, 44, 46, 48]
            assert (
                pg.psql(f"SELECT name FROM {prefix}_author WHERE id = {author.id}") == "author two"
            )

            async with AsyncSession(engine) as s:
                s.add(Author(name="rolled back"))
                await s.flush()
                assert await s.scalar(select(func.count()).select_from(Author)) == 5
                await s.rollback()
                assert await s.scalar(select(func.count()).select_from(Author)) == 4
                s.add(Author(name="author 0"))
                with pytest.raises(IntegrityError):
                    await s.commit()
                await s.rollback()
                s.add(Author(name="kept"))
                await s.commit()
            assert pg.psql(f"SELECT string_agg(name, ',' ORDER BY id) FROM {prefix}_author") == (
                "author 0,author 1,author two,author 3,kept"
            )
            async with engine.begin() as conn:
                await conn.run_sync(Base.metadata.drop_all)
            assert (
                pg.psql(f"SELECT count(*) FROM pg_tables WHERE tablename LIKE '{prefix}%'") == "0"
            )
    finally:
        await engine.dispose()
